"""Prometheus metrics: known traffic to a real server, read back from its HTTP endpoint."""

from __future__ import annotations

import argparse
import re
import time
import urllib.request

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from rnnstream_client._proto.rnnstream.v1 import rnnstream_pb2 as pb
from rnnstream_client._proto.rnnstream.v1 import rnnstream_pb2_grpc as pb_grpc

from rnnstream.config import METRICS_PORT_AUTO, add_server_options, resolve_config
from rnnstream.engine.observer import BatchStats
from rnnstream.metrics import PrometheusObserver, worker_metrics_port

from .cli_helpers import ServeProcess
from .conftest import RedisProcess

# No proxy from the environment: scrapes go straight to the loopback endpoint.
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Scrape:
    """One scrape of a metrics endpoint: every sample, looked up by name and labels."""

    def __init__(self, port: int) -> None:
        with HTTP.open(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            self.text = response.read().decode()
        self.families = list(text_string_to_metric_families(self.text))
        self.samples = [sample for family in self.families for sample in family.samples]

    def value(self, name: str, **labels: str) -> float | None:
        """Sum the samples of `name` whose labels include `labels`; None when there is none."""
        values = [
            sample.value
            for sample in self.samples
            if sample.name == name and all(sample.labels.get(key) == value for key, value in labels.items())
        ]
        return sum(values) if values else None

    def series(self) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
        return {(sample.name, tuple(sorted(sample.labels.items()))) for sample in self.samples}

    def names(self) -> set[str]:
        return {sample.name for sample in self.samples}


def wait_for_value(port: int, name: str, expected: float, timeout: float = 10, **labels: str) -> Scrape:
    """Scrape until `name` with `labels` equals `expected`; return that scrape or fail with the last value."""
    deadline = time.monotonic() + timeout
    while True:
        scrape = Scrape(port)
        if scrape.value(name, **labels) == expected:
            return scrape
        if time.monotonic() > deadline:
            pytest.fail(
                f"{name}{labels} is {scrape.value(name, **labels)}, expected {expected} within {timeout} s"
            )
        time.sleep(0.05)


@pytest.fixture
def metrics_server(start_server, redis_url):
    return start_server(redis_url=redis_url, metrics_port=METRICS_PORT_AUTO)


@pytest.fixture
def stub(metrics_server):
    with grpc.insecure_channel(metrics_server.target) as channel:
        yield pb_grpc.RnnStreamStub(channel)


def code_of(call, *args, **kwargs) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, timeout=10, **kwargs)
    return caught.value.code()


# -- counts from a live server ------------------------------------------------


def test_counts_match_traffic(metrics_server, stub):
    models = {model.name: model for model in stub.ListModels(pb.ListModelsRequest(), timeout=10).models}
    for name in ("tiny-lstm", "tiny-gru"):
        session_ids = []
        for _ in range(3):
            reply = stub.CreateSession(pb.CreateSessionRequest(model=name, prompt="abc"), timeout=10)
            session_ids.append(reply.session_id)
            stub.Step(pb.StepRequest(session_id=reply.session_id, text="hello"), timeout=10)
            stub.Step(pb.StepRequest(session_id=reply.session_id, token_ids=[1, 2]), timeout=10)
        empty = stub.CreateSession(pb.CreateSessionRequest(model=name), timeout=10)
        stub.Step(pb.StepRequest(session_id=empty.session_id, text="z"), timeout=10)
        stub.GetSession(pb.GetSessionRequest(session_id=empty.session_id), timeout=10)
        for session_id in session_ids[:2]:
            stub.DeleteSession(pb.DeleteSessionRequest(session_id=session_id), timeout=10)

    scrape = Scrape(metrics_server.app.metrics_port)
    for rpc, count in {
        "ListModels": 1,
        "CreateSession": 8,
        "Step": 14,
        "GetSession": 2,
        "DeleteSession": 4,
    }.items():
        assert scrape.value("rnnstream_requests_total", rpc=rpc, code="OK") == count, rpc
        assert scrape.value("rnnstream_requests_total", rpc=rpc) == count, rpc
        assert scrape.value("rnnstream_rpc_duration_seconds_count", rpc=rpc) == count, rpc
        assert scrape.value("rnnstream_requests_in_flight", rpc=rpc) == 0, rpc

    for name, architecture in (("tiny-lstm", "lstm"), ("tiny-gru", "gru")):
        model = models[name]
        labels = {"model": name, "architecture": architecture, "device": model.device}
        # Per model: 3 prompts of 3 tokens, 6 steps of 5 or 2 tokens, 1 of 1 token, each alone in its batch.
        assert scrape.value("rnnstream_tokens_total", **labels) == 31
        assert scrape.value("rnnstream_request_tokens_count", **labels) == 10
        assert scrape.value("rnnstream_request_tokens_sum", **labels) == 31
        assert scrape.value("rnnstream_request_tokens_bucket", le="2.0", **labels) == 4
        assert scrape.value("rnnstream_request_tokens_bucket", le="4.0", **labels) == 7
        assert scrape.value("rnnstream_batch_size_count", **labels) == 10
        assert scrape.value("rnnstream_batch_size_sum", **labels) == 10
        assert scrape.value("rnnstream_model_step_seconds_count", **labels) == 10
        assert scrape.value("rnnstream_queue_wait_seconds_count", **labels) == 10
        assert scrape.value("rnnstream_state_load_seconds_count", **labels) == 10
        assert scrape.value("rnnstream_state_save_seconds_count", **labels) == 10
        # A prompt's step creates its session, so only the 7 later steps load a state.
        assert scrape.value("rnnstream_state_read_bytes_total", **labels) == 7 * model.state_size_bytes
        assert scrape.value("rnnstream_state_written_bytes_total", **labels) == 10 * model.state_size_bytes
        assert scrape.value("rnnstream_sessions_created_total", model=name, architecture=architecture) == 4
        assert scrape.value("rnnstream_sessions_deleted_total", model=name, architecture=architecture) == 2
        assert scrape.value("rnnstream_sessions_expired_total", model=name, architecture=architecture) == 0
        assert scrape.value("rnnstream_queued_steps", **labels) == 0
        assert scrape.value("rnnstream_models_loaded", architecture=architecture, device=model.device) == 1

    assert scrape.value("rnnstream_store_available") == 1
    if all(model.device == "cpu" for model in models.values()):
        assert "rnnstream_device_memory_allocated_bytes" not in scrape.text


def test_histogram_buckets_span_100us_to_60s(metrics_server, stub):
    stub.ListModels(pb.ListModelsRequest(), timeout=10)
    scrape = Scrape(metrics_server.app.metrics_port)
    bounds = [
        float(sample.labels["le"])
        for sample in scrape.samples
        if sample.name == "rnnstream_model_step_seconds_bucket" and sample.labels["model"] == "tiny-gru"
    ]
    assert bounds[0] == 0.0001
    assert bounds[-2] == 60.0
    assert bounds[-1] == float("inf")


def test_error_counts_by_status_code(metrics_server, stub):
    port = metrics_server.app.metrics_port
    session_id = stub.CreateSession(
        pb.CreateSessionRequest(model="tiny-gru", prompt="ab"), timeout=10
    ).session_id
    before = Scrape(port)

    assert (
        code_of(stub.CreateSession, pb.CreateSessionRequest(model="no-such-model"))
        == grpc.StatusCode.NOT_FOUND
    )
    assert code_of(stub.Step, pb.StepRequest(session_id="missing", text="a")) == grpc.StatusCode.NOT_FOUND
    assert (
        code_of(stub.Step, pb.StepRequest(session_id="bad id!", text="a")) == grpc.StatusCode.INVALID_ARGUMENT
    )
    wrong_position = pb.StepRequest(session_id=session_id, text="a", expected_position=99)
    assert code_of(stub.Step, wrong_position) == grpc.StatusCode.ABORTED

    after = Scrape(port)

    def increase(rpc: str, code: str) -> float:
        return (after.value("rnnstream_requests_total", rpc=rpc, code=code) or 0) - (
            before.value("rnnstream_requests_total", rpc=rpc, code=code) or 0
        )

    assert increase("CreateSession", "NOT_FOUND") == 1
    assert increase("CreateSession", "OK") == 0
    assert increase("Step", "NOT_FOUND") == 1
    assert increase("Step", "INVALID_ARGUMENT") == 1
    assert increase("Step", "ABORTED") == 1
    assert increase("Step", "OK") == 0
    assert after.value("rnnstream_rpc_duration_seconds_count", rpc="Step") == 3


def test_unknown_method_counted_without_its_name(metrics_server):
    with grpc.insecure_channel(metrics_server.target) as channel:
        call = channel.unary_unary("/rnnstream.v1.RnnStream/NoSuchMethod")
        assert code_of(call, b"") == grpc.StatusCode.UNIMPLEMENTED
    scrape = Scrape(metrics_server.app.metrics_port)
    assert scrape.value("rnnstream_requests_total", rpc="unknown", code="UNIMPLEMENTED") == 1
    assert "NoSuchMethod" not in scrape.text


def test_generate_records_token_latencies(metrics_server, stub):
    session_id = stub.CreateSession(pb.CreateSessionRequest(model="tiny-lstm"), timeout=10).session_id
    request = pb.GenerateRequest(session_id=session_id, max_tokens=5, temperature=0)
    responses = list(stub.Generate(request, timeout=10))
    assert sum(len(response.token_ids) for response in responses) == 5

    scrape = Scrape(metrics_server.app.metrics_port)
    labels = {"model": "tiny-lstm", "architecture": "lstm"}
    assert scrape.value("rnnstream_requests_total", rpc="Generate", code="OK") == 1
    assert scrape.value("rnnstream_time_to_first_token_seconds_count", **labels) == 1
    assert scrape.value("rnnstream_inter_token_latency_seconds_count", **labels) == 4
    assert scrape.value("rnnstream_time_to_first_token_seconds_count", model="tiny-gru") == 0


def test_streaming_error_counted(metrics_server, stub):
    request = pb.GenerateRequest(session_id="missing", max_tokens=3)
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Generate(request, timeout=10))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    scrape = Scrape(metrics_server.app.metrics_port)
    assert scrape.value("rnnstream_requests_total", rpc="Generate", code="NOT_FOUND") == 1
    assert scrape.value("rnnstream_requests_total", rpc="Generate", code="OK") == 0


def test_cancelled_and_timed_out_streams(metrics_server):
    port = metrics_server.app.metrics_port
    with grpc.insecure_channel(metrics_server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
        next(watch)  # the stream is open once its first status arrives
        assert wait_for_value(port, "rnnstream_requests_in_flight", 1, rpc="Watch")
        watch.cancel()
        wait_for_value(port, "rnnstream_requests_total", 1, rpc="Watch", code="CANCELLED")

        timed_out = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=0.5)
        with pytest.raises(grpc.RpcError) as caught:
            list(timed_out)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        scrape = wait_for_value(port, "rnnstream_requests_total", 1, rpc="Watch", code="DEADLINE_EXCEEDED")
    assert scrape.value("rnnstream_requests_in_flight", rpc="Watch") == 0


def test_series_do_not_grow_with_sessions(metrics_server, stub):
    def session_traffic(count: int) -> list[str]:
        session_ids = []
        for index in range(count):
            model = ("tiny-lstm", "tiny-gru")[index % 2]
            session_id = stub.CreateSession(
                pb.CreateSessionRequest(model=model, prompt="hi"), timeout=10
            ).session_id
            stub.Step(pb.StepRequest(session_id=session_id, text="there"), timeout=10)
            stub.GetSession(pb.GetSessionRequest(session_id=session_id), timeout=10)
            stub.DeleteSession(pb.DeleteSessionRequest(session_id=session_id), timeout=10)
            session_ids.append(session_id)
        return session_ids

    port = metrics_server.app.metrics_port
    session_traffic(2)
    few = Scrape(port)
    session_ids = session_traffic(40)
    many = Scrape(port)

    assert many.series() == few.series()
    assert many.value("rnnstream_requests_total", rpc="CreateSession", code="OK") == 42
    for session_id in session_ids:
        assert session_id not in many.text


def test_store_outage_reported(start_server, tmp_path):
    redis = RedisProcess(tmp_path / "redis").start()
    try:
        server = start_server(redis_url=redis.url, redis_timeout=0.2, metrics_port=METRICS_PORT_AUTO)
        port = server.app.metrics_port
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.RnnStreamStub(channel)
            session_id = stub.CreateSession(pb.CreateSessionRequest(model="tiny-gru"), timeout=10).session_id
            wait_for_value(port, "rnnstream_store_available", 1)

            redis.stop()
            wait_for_value(port, "rnnstream_store_available", 0)
            assert (
                code_of(stub.Step, pb.StepRequest(session_id=session_id, text="a"))
                == grpc.StatusCode.UNAVAILABLE
            )
        scrape = Scrape(port)
        assert scrape.value("rnnstream_requests_total", rpc="Step", code="UNAVAILABLE") == 1
    finally:
        redis.stop()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_memory_on_cuda(start_server, redis_url):
    server = start_server(redis_url=redis_url, device="cuda:0", metrics_port=METRICS_PORT_AUTO)
    scrape = Scrape(server.app.metrics_port)
    assert scrape.value("rnnstream_device_memory_allocated_bytes", device="cuda:0") > 0
    assert scrape.value("rnnstream_device_memory_reserved_bytes", device="cuda:0") > 0
    assert scrape.value("rnnstream_models_loaded", device="cuda:0") == 2


# -- endpoint and configuration -------------------------------------------------


def test_metrics_endpoint_off_by_default(server):
    assert server.app.metrics_port == 0
    with grpc.insecure_channel(server.target) as channel:
        pb_grpc.RnnStreamStub(channel).ListModels(pb.ListModelsRequest(), timeout=10)
    text = generate_latest(server.app.registry).decode()
    assert 'rnnstream_requests_total{code="OK",rpc="ListModels"} 1.0' in text


@pytest.mark.parametrize(
    ("argv", "environ", "expected"),
    [
        ([], {}, 0),
        (["--metrics-port", "9100"], {}, 9100),
        (["--metrics-port", "auto"], {}, METRICS_PORT_AUTO),
        ([], {"RNNSTREAM_METRICS_PORT": "auto"}, METRICS_PORT_AUTO),
        (["--metrics-port", "9101"], {"RNNSTREAM_METRICS_PORT": "auto"}, 9101),
    ],
)
def test_metrics_port_option(argv, environ, expected):
    parser = argparse.ArgumentParser()
    add_server_options(parser)
    assert resolve_config(parser.parse_args(argv), environ).metrics_port == expected


@pytest.mark.parametrize("value", ["-1", "65536", "any"])
def test_metrics_port_option_rejects(value):
    parser = argparse.ArgumentParser()
    add_server_options(parser)
    with pytest.raises(ValueError, match=f"invalid value '{value}' for --metrics-port"):
        resolve_config(parser.parse_args(["--metrics-port", value]), {})


@pytest.mark.parametrize(
    ("base", "worker", "expected"),
    [(9100, 0, 9100), (9100, 3, 9103), (0, 2, 0), (METRICS_PORT_AUTO, 2, METRICS_PORT_AUTO)],
)
def test_worker_metrics_port(base, worker, expected):
    assert worker_metrics_port(base, worker) == expected


def test_serve_logs_metrics_address(tiny_models_dir):
    process = ServeProcess("--models-dir", str(tiny_models_dir), "--metrics-port", "auto")
    try:
        assert process.wait_for_log("Prometheus metrics on http://"), process.log
        match = re.search(r"Prometheus metrics on http://127\.0\.0\.1:(\d+)/metrics", process.log)
        assert match, process.log
        scrape = Scrape(int(match.group(1)))
        assert scrape.value("rnnstream_models_loaded", architecture="lstm") == 1
        assert scrape.value("rnnstream_models_loaded", architecture="gru") == 1
        assert process.terminate() == 0
    finally:
        process.stop()
    assert "stopped serving on 127.0.0.1:" in process.log


# -- the observer alone ---------------------------------------------------------


def batch_stats(**overrides) -> BatchStats:
    values = dict(
        model="m",
        architecture="gru",
        device="cpu",
        size=2,
        tokens=7,
        request_tokens=[3, 4],
        queue_wait_s=[0.0002, 0.003],
        load_s=0.0012,
        compute_s=0.0003,
        store_s=0.02,
        bytes_read=768,
        bytes_written=1536,
    )
    return BatchStats(**{**values, **overrides})


def test_observer_records_batch():
    registry = CollectorRegistry()
    observer = PrometheusObserver(registry)
    observer.batch_done(batch_stats())
    observer.batch_done(batch_stats(size=1, tokens=1, request_tokens=[1], queue_wait_s=[0.5], compute_s=2.0))
    labels = {"model": "m", "architecture": "gru", "device": "cpu"}

    def sample(name: str, **extra: str) -> float | None:
        return registry.get_sample_value(name, {**labels, **extra})

    assert sample("rnnstream_model_step_seconds_count") == 2
    assert sample("rnnstream_model_step_seconds_bucket", le="0.00025") == 0
    assert sample("rnnstream_model_step_seconds_bucket", le="0.0005") == 1
    assert sample("rnnstream_model_step_seconds_bucket", le="2.5") == 2
    assert sample("rnnstream_batch_size_sum") == 3
    assert sample("rnnstream_tokens_total") == 8
    assert sample("rnnstream_request_tokens_count") == 3
    assert sample("rnnstream_queue_wait_seconds_count") == 3
    assert sample("rnnstream_queue_wait_seconds_bucket", le="0.00025") == 1
    assert sample("rnnstream_state_load_seconds_bucket", le="0.001") == 0
    assert sample("rnnstream_state_load_seconds_bucket", le="0.0025") == 2
    assert sample("rnnstream_state_save_seconds_sum") == pytest.approx(0.04)
    assert sample("rnnstream_state_read_bytes_total") == 1536
    assert sample("rnnstream_state_written_bytes_total") == 3072


def test_observer_records_sessions_and_tokens():
    registry = CollectorRegistry()
    observer = PrometheusObserver(registry)
    observer.session_created("m", "lstm")
    observer.session_created("m", "lstm")
    observer.session_deleted("m", "lstm")
    observer.session_expired("m", "lstm")
    observer.generated_token("m", "lstm", "cpu", 0.004, True)
    observer.generated_token("m", "lstm", "cpu", 0.0004, False)
    observer.generated_token("m", "lstm", "cpu", 0.0006, False)
    observer.queue_depth("m", "lstm", "cpu", 5)
    session_labels = {"model": "m", "architecture": "lstm"}
    labels = {**session_labels, "device": "cpu"}

    assert registry.get_sample_value("rnnstream_sessions_created_total", session_labels) == 2
    assert registry.get_sample_value("rnnstream_sessions_deleted_total", session_labels) == 1
    assert registry.get_sample_value("rnnstream_sessions_expired_total", session_labels) == 1
    assert registry.get_sample_value("rnnstream_time_to_first_token_seconds_count", labels) == 1
    assert (
        registry.get_sample_value("rnnstream_time_to_first_token_seconds_bucket", {**labels, "le": "0.005"})
        == 1
    )
    assert registry.get_sample_value("rnnstream_inter_token_latency_seconds_count", labels) == 2
    assert (
        registry.get_sample_value("rnnstream_inter_token_latency_seconds_bucket", {**labels, "le": "0.0005"})
        == 1
    )
    assert registry.get_sample_value("rnnstream_queued_steps", labels) == 5
