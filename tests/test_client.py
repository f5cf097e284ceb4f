"""The SDK: typed results, errors that keep the status, and no server-side dependencies."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import time

import grpc
import pytest
from rnnstream_client import Client, NotFoundError, RnnstreamError, SessionInfo, StepResult

from rnnstream.engine.runner import resolve_device

from .conftest import TEST_DEVICE


def test_session_lifecycle(server):
    with Client(server.target, timeout=10) as client:
        models = {model.name: model for model in client.list_models()}
        assert models["tiny-lstm"].architecture == "lstm"
        assert models["tiny-lstm"].state_size_bytes == 2 * 2 * 48 * 4
        assert models["tiny-gru"].state_size_bytes == 2 * 48 * 4
        assert models["tiny-gru"].device == str(resolve_device(TEST_DEVICE))

        session = client.create_session("tiny-lstm", ttl_seconds=120, prompt="The ", top_k=4)
        assert len(session.id) == 32
        assert session.position == 4
        assert len(session.last.next_tokens) == 4

        result = session.step("cat", top_k=2)
        assert isinstance(result, StepResult)
        assert result.position == 7
        assert result.input_token_ids == [99, 97, 116]
        assert len(result.input_logprobs) == 3
        assert all(value <= 0 for value in result.input_logprobs)
        assert [item.logprob for item in result.next_tokens] == sorted(
            (item.logprob for item in result.next_tokens), reverse=True
        )

        info = session.info()
        assert isinstance(info, SessionInfo)
        assert info.model == "tiny-lstm"
        assert info.position == 7
        assert info.ttl_seconds == 120
        assert 0 < info.ttl_remaining_seconds <= 120
        assert info.updated_at >= info.created_at

        session.delete()
        with pytest.raises(NotFoundError) as caught:
            session.info()
        assert caught.value.code == grpc.StatusCode.NOT_FOUND
        assert session.id in caught.value.details
        assert isinstance(caught.value.__cause__, grpc.RpcError)


def test_server_ids_are_unique(server):
    with Client(server.target) as client:
        ids = {client.create_session("tiny-gru").id for _ in range(50)}
    assert len(ids) == 50


def test_deadline_applies_to_calls():
    """A peer that accepts TCP but never speaks HTTP/2 makes the call wait for its deadline."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        with Client(f"127.0.0.1:{silent.getsockname()[1]}", timeout=0.5) as client:
            started = time.monotonic()
            with pytest.raises(RnnstreamError) as caught:
                client.list_models()
            elapsed = time.monotonic() - started
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed < 5


def test_sdk_works_without_server_dependencies(server):
    """The SDK imports and runs with torch, redis and prometheus_client made unimportable."""
    script = textwrap.dedent(
        f"""
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "redis", "prometheus_client", "rnnstream", "numpy"):
                    raise ImportError(f"blocked import of {{name}}")

        sys.meta_path.insert(0, Block())
        from rnnstream_client import Client

        with Client("{server.target}") as client:
            session = client.create_session("tiny-gru")
            print(session.step("Hi").position)
        assert not any(name.split(".")[0] in ("torch", "redis", "prometheus_client") for name in sys.modules)
        """
    )
    output = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert output.returncode == 0, output.stderr
    assert output.stdout.strip() == "2"
