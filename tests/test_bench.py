"""`rnnstream bench` as a subprocess against real servers; fields and invariants only, never speed."""

from __future__ import annotations

import json

import pytest
import redis

from rnnstream.bench.report import latency_summary_ms, percentile
from rnnstream.bench.scrape import parse_server_stats
from .cli_helpers import run_cli
from .conftest import free_port

SHORT_RUN = ("--duration", "2", "--warmup", "0.5", "--no-progress")


def read_record(path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def assert_sane_load(record: dict, sessions: int) -> None:
    assert record["sessions"] == sessions
    assert record["tokens"] > 0
    assert record["errors"] == 0, record["errors_by_code"]
    assert record["tokens_per_s"] == pytest.approx(record["tokens"] / record["window_s"])
    latency = record["latency_ms"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"]


@pytest.mark.parametrize("mode", ["step", "stream"])
def test_bench_server(start_server, redis_url, tmp_path, mode):
    metrics_port = free_port()
    server = start_server(redis_url=redis_url, metrics_port=metrics_port)
    output = tmp_path / "result.json"
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    completed = run_cli(
        "bench", "--target", server.target, "--model", "tiny-gru", "--sessions", "4", "--mode", mode,
        "--metrics-url", metrics_url, "--json", str(output), *SHORT_RUN,
    )
    assert completed.returncode == 0, completed.stderr
    record = read_record(output)
    assert record["kind"] == "server"
    assert record["model"] == "tiny-gru"
    assert record["mode"] == mode
    assert_sane_load(record, 4)
    assert record["server"]["batches"] > 0
    assert 1 <= record["mean_batch_size"] <= 4
    assert "tiny-gru" in completed.stdout
    client = redis.Redis.from_url(redis_url)
    assert client.keys("rnnstream:session:*") == []  # the bench deletes its sessions
    client.close()


def test_bench_without_metrics_leaves_batch_blank(server, tmp_path):
    output = tmp_path / "result.json"
    completed = run_cli(
        "bench", "--target", server.target, "--sessions", "2", "--json", str(output), *SHORT_RUN,
    )
    assert completed.returncode == 0, completed.stderr
    record = read_record(output)
    assert_sane_load(record, 2)
    assert record["model"] == "tiny-gru"  # the first model the server lists
    assert record["mean_batch_size"] is None
    assert "pass --metrics-url" in completed.stdout


def test_bench_transport_ceiling(tmp_path):
    output = tmp_path / "result.json"
    completed = run_cli("bench", "--ceiling", "transport", "--sessions", "4", "--json", str(output), *SHORT_RUN)
    assert completed.returncode == 0, completed.stderr
    record = read_record(output)
    assert record["kind"] == "transport"
    assert record["target"].startswith("127.0.0.1:")
    assert_sane_load(record, 4)


def test_bench_model_ceiling(tiny_models_dir, tmp_path):
    output = tmp_path / "result.json"
    completed = run_cli(
        "bench", "--ceiling", "model", "--models-dir", str(tiny_models_dir), "--model", "tiny-lstm",
        "--batch", "3", "--duration", "0.5", "--warmup", "0.1", "--json", str(output),
    )
    assert completed.returncode == 0, completed.stderr
    record = read_record(output)
    assert record["kind"] == "model_ceiling"
    assert record["architecture"] == "lstm"
    assert record["steps"] > 0
    assert record["tokens"] == 3 * record["steps"]
    latency = record["step_latency_ms"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"]


def test_bench_prefill(server, tiny_models_dir, tmp_path):
    output = tmp_path / "result.json"
    completed = run_cli(
        "bench", "--prefill", "--target", server.target, "--models-dir", str(tiny_models_dir), "--model", "tiny-lstm",
        "--prefill-chars", "300", "--repeats", "2", "--json", str(output),
    )
    assert completed.returncode == 0, completed.stderr
    record = read_record(output)
    assert record["tokens"] == 300
    assert record["server_ms"]["p50"] > 0
    assert record["raw_forward_ms"]["p50"] > 0
    assert record["server_to_raw"] == pytest.approx(record["raw_forward_ms"]["p50"] / record["server_ms"]["p50"])


def test_bench_unknown_model_fails(server):
    completed = run_cli("bench", "--target", server.target, "--model", "absent", *SHORT_RUN)
    assert completed.returncode == 1
    assert "model 'absent' not found" in completed.stderr
    assert "tiny-gru" in completed.stderr


def test_percentile_nearest_rank():
    values = [float(value) for value in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([7.0], 95) == 7.0
    assert latency_summary_ms([]) == {"p50": None, "p95": None, "p99": None, "mean": None}


def metrics_text(count_a: float, sum_a: float) -> str:
    """Prometheus text with batch-size series of models a and b, and a step-time series of model a."""
    return "\n".join(
        [
            "# TYPE rnnstream_batch_size histogram",
            f'rnnstream_batch_size_bucket{{architecture="gru",device="cpu",le="+Inf",model="a"}} {count_a}',
            f'rnnstream_batch_size_count{{architecture="gru",device="cpu",model="a"}} {count_a}',
            f'rnnstream_batch_size_sum{{architecture="gru",device="cpu",model="a"}} {sum_a}',
            'rnnstream_batch_size_count{architecture="lstm",device="cpu",model="b"} 1.0',
            'rnnstream_batch_size_sum{architecture="lstm",device="cpu",model="b"} 64.0',
            "# TYPE rnnstream_model_step_seconds histogram",
            f'rnnstream_model_step_seconds_count{{architecture="gru",device="cpu",model="a"}} {count_a}',
            f'rnnstream_model_step_seconds_sum{{architecture="gru",device="cpu",model="a"}} {count_a * 0.0005}',
            "",
        ]
    )


def test_parse_server_stats_one_model():
    stats = parse_server_stats(metrics_text(4.0, 10.0), "a")
    assert stats.batches == 4
    assert stats.summary()["mean_batch_size"] == 2.5
    assert stats.summary()["mean_step_ms"] == pytest.approx(0.5)
    assert stats.summary()["mean_load_ms"] is None
    assert parse_server_stats(metrics_text(4.0, 10.0), "b").summary()["mean_batch_size"] == 64.0


def test_server_stats_difference():
    earlier = parse_server_stats(metrics_text(2.0, 4.0), "a")
    later = parse_server_stats(metrics_text(6.0, 16.0), "a")
    window = later.since(earlier)
    assert window.batches == 4
    assert window.summary()["mean_batch_size"] == 3.0
