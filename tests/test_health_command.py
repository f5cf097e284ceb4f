"""`rnnstream health`: the container health check, against real servers."""

from __future__ import annotations

import time

from .cli_helpers import run_cli
from .conftest import free_port


def test_serving_server_exits_zero(server):
    result = run_cli("health", "--target", server.target, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{server.target}: SERVING"


def test_target_from_environment(server):
    result = run_cli("health", env={"RNNSTREAM_TARGET": server.target}, timeout=60)
    assert result.returncode == 0, result.stderr


def test_store_down_is_not_serving(start_server):
    server = start_server(redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_timeout=0.2)
    deadline = time.monotonic() + 20
    while True:
        result = run_cli("health", "--target", server.target, timeout=60)
        if "NOT_SERVING" in result.stdout or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert result.returncode == 1
    assert result.stdout.strip() == f"{server.target}: NOT_SERVING"


def test_no_server_exits_one():
    target = f"127.0.0.1:{free_port()}"
    result = run_cli("health", "--target", target, "--timeout", "2", timeout=60)
    assert result.returncode == 1
    assert result.stderr.startswith(f"rnnstream health: {target}: UNAVAILABLE")
