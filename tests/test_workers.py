"""`rnnstream serve --workers N`: worker processes sharing one port through SO_REUSEPORT."""

from __future__ import annotations

import os
import re
import signal
import socket
import time
import urllib.request

import pytest
from rnnstream_client import Client

from rnnstream.api.workers import worker_config
from rnnstream.config import ServerConfig
from rnnstream.models.bundle import load_bundle

from .cli_helpers import ServeProcess, run_cli
from .conftest import free_port
from .deploy_helpers import list_models_pid
from .reference import reference_logprobs
from .test_oracle import TEXT, assert_close, chunks_of

WORKER_PATTERN = re.compile(r"as worker (\d+) of (\d+), pid (\d+)")


def free_port_pair() -> int:
    """A free port P whose neighbour P + 1 is free too, for two workers' metrics endpoints."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports found")


def worker_pids(process: ServeProcess, count: int, timeout: float = 60) -> dict[int, int]:
    """Wait until `count` workers log that they serve; return {worker index: pid}."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = {int(match[0]): int(match[2]) for match in WORKER_PATTERN.findall(process.log)}
        if len(workers) == count:
            return workers
        assert process.process.poll() is None, process.log
        time.sleep(0.05)
    raise AssertionError(f"{count} workers did not start:\n{process.log}")


def is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def two_workers(tiny_models_dir, redis_url):
    metrics_port = free_port_pair()
    process = ServeProcess(
        "--models-dir", str(tiny_models_dir), "--redis-url", redis_url, "--workers", "2",
        "--metrics-port", str(metrics_port),
        timeout=180,  # two processes each import torch and load models; slow on a loaded 2-core machine
    )
    process.metrics_port = metrics_port
    process.workers = worker_pids(process, 2, timeout=180)
    yield process
    process.stop()
    for pid in process.workers.values():
        if is_running(pid):
            os.kill(pid, signal.SIGKILL)


def test_workers_share_port_and_sessions(two_workers, tiny_models_dir):
    workers = two_workers.workers
    assert set(workers) == {0, 1}
    assert two_workers.process.pid not in workers.values()

    # The kernel spreads new connections over the workers.
    served = {list_models_pid(two_workers.target) for _ in range(40)}
    assert served == set(workers.values()), f"40 connections reached {served}, workers are {workers}"

    # A session created on one connection continues on others, whichever worker serves them.
    bundle = load_bundle(tiny_models_dir / "tiny-gru")
    tokens = bundle.tokenizer.encode(TEXT)
    expected_inputs, expected_next = reference_logprobs(bundle.model, tokens)
    with Client(two_workers.target) as client:
        session = client.create_session("tiny-gru")
    input_logprobs = []
    for piece in chunks_of(tokens, 16):
        with Client(two_workers.target) as client:
            result = client.session(session.id, position=session.position).step(piece, top_k=5)
        session.position = result.position
        input_logprobs += result.input_logprobs
    assert_close(input_logprobs, expected_inputs, "input log-probs across workers")
    top_logprobs = [item.logprob for item in result.next_tokens]
    assert_close(top_logprobs, expected_next.topk(5).values.tolist(), "top-k")


def test_each_worker_serves_metrics(two_workers):
    for offset in (0, 1):
        url = f"http://127.0.0.1:{two_workers.metrics_port + offset}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            assert "rnnstream_models_loaded" in reply.read().decode(), url


def test_sigterm_stops_every_worker(two_workers):
    assert two_workers.terminate(timeout=60) == 0, two_workers.log
    for index, pid in two_workers.workers.items():
        assert not is_running(pid), f"worker {index} (pid {pid}) still runs"
    assert "all workers exited with codes [0, 0]" in two_workers.log
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", two_workers.port), timeout=1).close()


def test_worker_exit_stops_supervisor(two_workers):
    os.kill(two_workers.workers[1], signal.SIGKILL)
    assert two_workers.process.wait(60) == 1, two_workers.log
    assert not is_running(two_workers.workers[0])
    assert "worker 1 (pid" in two_workers.log


def test_workers_require_redis(tiny_models_dir):
    result = run_cli("serve", "--models-dir", str(tiny_models_dir), "--port", "0", "--workers", "2",
                     env={"RNNSTREAM_REDIS_URL": ""})
    assert result.returncode == 1
    assert "--workers 2 requires --redis-url" in result.stderr


@pytest.mark.parametrize("device, cuda_devices, expected", [
    ("cuda", 3, ["cuda:0", "cuda:1", "cuda:2", "cuda:0"]),
    ("auto", 2, ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]),
    ("cuda", 1, ["cuda", "cuda", "cuda", "cuda"]),
    ("cuda:1", 3, ["cuda:1", "cuda:1", "cuda:1", "cuda:1"]),
    ("cpu", 3, ["cpu", "cpu", "cpu", "cpu"]),
])
def test_worker_devices(device, cuda_devices, expected):
    config = ServerConfig(device=device, workers=4)
    assert [worker_config(config, index, cuda_devices).device for index in range(4)] == expected


def test_worker_metrics_ports():
    config = ServerConfig(metrics_port=9100, workers=3)
    assert [worker_config(config, index, 0).metrics_port for index in range(3)] == [9100, 9101, 9102]
    assert worker_config(ServerConfig(metrics_port=0), 1, 0).metrics_port == 0
    auto = ServerConfig(metrics_port=-1, workers=2)  # --metrics-port auto: each worker picks a free port
    assert [worker_config(auto, index, 0).metrics_port for index in range(2)] == [-1, -1]
