"""Shared fixtures: a real redis-server on a free port, tiny model bundles, and real gRPC servers."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import redis
import torch

from rnnstream.api.server import App, build_server
from rnnstream.config import ServerConfig
from rnnstream.models.bundle import save_bundle
from rnnstream.models.network import ModelConfig, RecurrentLM
from rnnstream.models.tokenizer import ByteTokenizer

REDIS_SERVER = shutil.which("redis-server")
# Device of the servers the tests start; RNNSTREAM_TEST_DEVICE=cuda runs them on a GPU.
TEST_DEVICE = os.environ.get("RNNSTREAM_TEST_DEVICE", "cpu")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisProcess:
    """A redis-server child process on a free loopback port, with no persistence unless asked."""

    def __init__(self, directory: Path, port: int | None = None, appendonly: bool = False) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.appendonly = appendonly  # with appendfsync always, so a killed server loses no acknowledged write
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisProcess":
        if REDIS_SERVER is None:
            pytest.fail("redis-server is not installed; .ci/run installs it with apt-get")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always",
                "--dir", str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(f"redis-server on port {self.port} did not start")
                time.sleep(0.05)
        client.close()
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None


@pytest.fixture(scope="session")
def redis_process(tmp_path_factory):
    process = RedisProcess(tmp_path_factory.mktemp("redis")).start()
    yield process
    process.stop()


@pytest.fixture
def redis_url(redis_process) -> str:
    client = redis.Redis.from_url(redis_process.url)
    client.flushdb()
    client.close()
    return redis_process.url


def build_tiny_model(architecture: str, seed: int, hidden_size: int = 48, num_layers: int = 2) -> RecurrentLM:
    torch.manual_seed(seed)
    model = RecurrentLM(
        ModelConfig(
            architecture=architecture,
            vocab_size=256,
            embedding_size=16,
            hidden_size=hidden_size,
            num_layers=num_layers,
        )
    )
    # Random weights of a larger scale than the default init give peaked, varied distributions.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(3.0)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory) -> Path:
    """Two bundles with random weights: tiny-lstm and tiny-gru."""
    directory = tmp_path_factory.mktemp("models")
    for seed, architecture in enumerate(("lstm", "gru")):
        name = f"tiny-{architecture}"
        save_bundle(directory / name, name, build_tiny_model(architecture, seed), ByteTokenizer())
    return directory


class ServerThread:
    """A real rnnstream gRPC server, built by build_server, on its own event loop thread."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.app: App = self.run(build_server(config))
        self.port = self.app.port
        self.target = f"127.0.0.1:{self.port}"

    def run(self, coroutine, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self, grace: float = 0) -> None:
        self.run(self.app.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def start_server(tiny_models_dir):
    """Start servers with config overrides; every server is stopped after the test."""
    servers: list[ServerThread] = []

    def start(**overrides) -> ServerThread:
        settings = {"models_dir": tiny_models_dir, "port": 0, "device": TEST_DEVICE, **overrides}
        server = ServerThread(ServerConfig(**settings))
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def server(start_server, redis_url) -> ServerThread:
    return start_server(redis_url=redis_url)
