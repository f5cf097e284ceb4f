"""Smoke tests of the real CLI: serve, complete and train as subprocesses."""

from __future__ import annotations

import json

import pytest
from rnnstream_client import Client

from .cli_helpers import ServeProcess, run_cli


@pytest.fixture
def served(tiny_models_dir, redis_url):
    process = ServeProcess("--models-dir", str(tiny_models_dir), env={"RNNSTREAM_REDIS_URL": redis_url})
    yield process
    process.stop()


def test_serve_and_complete(served):
    assert "session store: redis at 127.0.0.1" in served.log
    output = run_cli("complete", "Hello there", "--model", "tiny-gru", "--top-k", "3", "--target", served.target)
    assert output.returncode == 0, output.stderr
    assert "model tiny-gru" in output.stdout
    assert "position 11" in output.stdout
    assert len([line for line in output.stdout.splitlines() if line.startswith("  0.")]) == 3


def test_complete_in_chunks_scores_whole_text(served):
    whole = run_cli("complete", "Hello there", "--model", "tiny-lstm", "--target", served.target)
    chunked = run_cli("complete", "Hello there", "--model", "tiny-lstm", "--chunk", "2", "--target", served.target)
    assert whole.returncode == 0, whole.stderr
    assert chunked.returncode == 0, chunked.stderr
    assert whole.stdout.splitlines()[1:] == chunked.stdout.splitlines()[1:]


def test_complete_reports_unknown_model(served):
    output = run_cli("complete", "Hi", "--model", "nope", "--target", served.target)
    assert output.returncode == 1
    assert "NOT_FOUND: model 'nope' not found" in output.stderr


def test_sigterm_stops_cleanly(served):
    with Client(served.target) as client:
        client.create_session("tiny-gru", prompt="abc")
    assert served.terminate() == 0
    assert "stopping: draining in-flight calls" in served.log
    assert "stopped" in served.log


def test_serve_without_redis_warns(tiny_models_dir):
    process = ServeProcess(
        "--models-dir", str(tiny_models_dir), env={"RNNSTREAM_REDIS_URL": "", "RNNSTREAM_TORCH_THREADS": "1"}
    )
    try:
        assert "sessions live in this process only and are lost on restart" in process.log
        assert "torch CPU threads: 1" in process.log
    finally:
        process.stop()


def test_serve_rejects_invalid_setting(tiny_models_dir):
    output = run_cli("serve", "--models-dir", str(tiny_models_dir), env={"RNNSTREAM_MAX_BATCH": "zero"})
    assert output.returncode == 2
    assert "invalid value 'zero' for RNNSTREAM_MAX_BATCH" in output.stderr


def test_serve_rejects_missing_models_dir(tmp_path):
    output = run_cli("serve", "--models-dir", str(tmp_path / "absent"), "--port", "0")
    assert output.returncode == 1
    assert f"models directory {tmp_path / 'absent'} does not exist" in output.stdout + output.stderr


def test_serve_json_logs(tiny_models_dir):
    process = ServeProcess("--models-dir", str(tiny_models_dir), "--log-format", "json")
    try:
        entries = [json.loads(line) for line in process.lines if line.startswith("{")]
        assert any("serving on" in entry["message"] for entry in entries)
        assert all({"time", "level", "logger", "message"} <= entry.keys() for entry in entries)
    finally:
        process.stop()


def test_train_writes_loadable_bundle(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 200)
    (corpus / "b.txt").write_text("pack my box with five dozen liquor jugs! " * 200)
    output = run_cli(
        "train", str(corpus), "--output", str(tmp_path / "fox-gru"), "--arch", "gru", "--hidden-size", "32",
        "--embedding-size", "8", "--steps", "30", "--batch-size", "8", "--seq-len", "32", "--no-progress",
    )
    assert output.returncode == 0, output.stderr
    assert "bits per character" in output.stdout
    config = json.loads((tmp_path / "fox-gru" / "config.json").read_text())
    assert config["model"]["architecture"] == "gru"
    assert config["training"]["steps"] == 30
    assert config["training"]["command"].startswith("rnnstream train ")
    card = (tmp_path / "fox-gru" / "README.md").read_text()
    assert "held-out bits per character" in card
    assert "unigram baseline" in card

    process = ServeProcess("--models-dir", str(tmp_path))
    try:
        with Client(process.target) as client:
            assert [model.name for model in client.list_models()] == ["fox-gru"]
            assert client.create_session("fox-gru", prompt="the quick").position == 9
    finally:
        process.stop()


def test_serve_reports_port_in_use(served, tiny_models_dir):
    port = served.target.rsplit(":", 1)[1]
    output = run_cli("serve", "--models-dir", str(tiny_models_dir), "--port", port)
    assert output.returncode == 1
    assert f"cannot start: could not listen on 127.0.0.1:{port}" in output.stdout + output.stderr
    assert "Traceback" not in output.stdout + output.stderr


def test_serve_reports_corrupt_weights(tmp_path, tiny_models_dir):
    import shutil

    shutil.copytree(tiny_models_dir / "tiny-gru", tmp_path / "tiny-gru")
    (tmp_path / "tiny-gru" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage!")
    output = run_cli("serve", "--models-dir", str(tmp_path), "--port", "0")
    assert output.returncode == 1
    assert "not a valid safetensors file" in output.stdout + output.stderr
    assert "Traceback" not in output.stdout + output.stderr


@pytest.mark.parametrize("arguments, message", [
    (["--steps", "0"], "invalid steps 0"),
    (["--minutes", "0"], "invalid minutes 0.0"),
    (["--seq-len", "0", "--steps", "2"], "invalid seq_len 0"),
])
def test_train_rejects_invalid_options(tmp_path, arguments, message):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a small corpus of text. " * 100)
    output = run_cli("train", str(corpus), "--output", str(tmp_path / "out"), "--no-progress", *arguments)
    assert output.returncode == 2
    assert message in output.stderr
    assert "Traceback" not in output.stderr


def test_train_rejects_tiny_corpus(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("x" * 300)
    output = run_cli("train", str(corpus), "--output", str(tmp_path / "out"), "--steps", "2", "--seq-len", "16")
    assert output.returncode == 2
    assert "held-out tokens" in output.stderr


def test_client_commands_delete_their_sessions(served, redis_url):
    import redis as redis_client

    ok = run_cli("generate", "Hello", "--model", "tiny-gru", "--max-tokens", "5", "--target", served.target)
    too_long = run_cli("generate", "Hello", "--model", "tiny-gru", "--max-tokens", "5000", "--target", served.target)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("Hello")
    assert too_long.returncode == 1
    assert "max_tokens 5000 is out of range" in too_long.stderr
    assert too_long.stdout == ""
    connection = redis_client.Redis.from_url(redis_url)
    assert connection.keys("rnnstream:session:*") == []
    connection.close()


def test_chat_streams_each_line(served):
    import subprocess
    import sys

    output = subprocess.run(
        [sys.executable, "-m", "rnnstream.cli", "chat", "--model", "tiny-lstm", "--max-tokens", "8", "--seed", "3",
         "--target", served.target],
        input="first line\nsecond line\n", capture_output=True, text=True, timeout=60,
    )
    assert output.returncode == 0, output.stderr
    assert output.stdout.startswith("session ")
    assert len(output.stdout.splitlines()) >= 3
