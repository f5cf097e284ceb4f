"""The session store and the server against a real three-master Redis Cluster on loopback."""

from __future__ import annotations

import concurrent.futures
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis
from rnnstream_client import Client

from rnnstream.errors import StoreUnavailable
from rnnstream.models.bundle import load_bundle
from rnnstream.state.record import SaveStatus
from rnnstream.state.redis_store import RedisStore, session_key

from .cli_helpers import ServeProcess
from .conftest import REDIS_SERVER, free_port
from .reference import reference_logprobs
from .test_oracle import TEXT, assert_close, chunks_of, irregular_chunks, run_chunks
from .test_store import make_record

REDIS_CLI = shutil.which("redis-cli")


class RedisClusterProcesses:
    """Three redis-server masters in cluster mode, joined by `redis-cli --cluster create`."""

    def __init__(self, directory: Path, masters: int = 3) -> None:
        if REDIS_SERVER is None or REDIS_CLI is None:
            pytest.fail("redis-server and redis-cli are not installed; .ci/run installs them with apt-get")
        self.ports = [free_port() for _ in range(masters)]
        self.processes: list[subprocess.Popen] = []
        for port in self.ports:
            node_dir = directory / str(port)
            node_dir.mkdir(parents=True)
            self.processes.append(
                subprocess.Popen(
                    [
                        REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1",
                        # An explicit bus port: the default, port + 10000, may exceed 65535.
                        "--cluster-port", str(free_port()),
                        "--cluster-enabled", "yes", "--cluster-config-file", str(node_dir / "nodes.conf"),
                        "--cluster-node-timeout", "2000", "--dir", str(node_dir),
                        "--save", "", "--appendonly", "no",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        self.clients = [redis.Redis(port=port, socket_connect_timeout=0.5) for port in self.ports]
        try:
            self._wait(lambda client: client.ping(), "start")
            result = subprocess.run(
                [REDIS_CLI, "--cluster", "create", *self.nodes, "--cluster-replicas", "0", "--cluster-yes"],
                capture_output=True, text=True, timeout=60,
            )
            assert result.returncode == 0, result.stdout + result.stderr
            self._wait(lambda client: client.cluster("info")["cluster_state"] == "ok", "reach state ok")
        except BaseException:
            self.stop()
            raise

    @property
    def nodes(self) -> list[str]:
        return [f"127.0.0.1:{port}" for port in self.ports]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(self.nodes[:2])

    def _wait(self, check, condition: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        for client, process in zip(self.clients, self.processes):
            while True:
                try:
                    if check(client):
                        break
                except redis.exceptions.RedisError:
                    pass
                if process.poll() is not None or time.monotonic() > deadline:
                    port = client.connection_pool.connection_kwargs["port"]
                    raise RuntimeError(f"Redis Cluster node on port {port} did not {condition}")
                time.sleep(0.05)

    def keys_per_node(self) -> list[int]:
        return [client.dbsize() for client in self.clients]

    def flush(self) -> None:
        for client in self.clients:
            client.flushall()

    def stop(self) -> None:
        for client in self.clients:
            client.close()
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait(10)


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory):
    cluster = RedisClusterProcesses(tmp_path_factory.mktemp("redis-cluster"))
    yield cluster
    cluster.stop()


@pytest.fixture
def cluster_url(redis_cluster) -> str:
    redis_cluster.flush()
    return redis_cluster.url


@pytest.fixture
def cluster_store(cluster_url):
    store = RedisStore(cluster_url, timeout_s=2.0)
    yield store
    store.close()


def test_store_spreads_sessions_over_masters(cluster_store, redis_cluster):
    ids = [f"s{index}" for index in range(60)]
    for session_id in ids:
        assert cluster_store.create(make_record(session_id))
    assert all(count > 0 for count in redis_cluster.keys_per_node()), redis_cluster.keys_per_node()

    # One pipelined batch touches every master; each compare-and-set succeeds or fails on its own.
    updates = [
        (make_record(session_id, position=1), 0 if index % 3 else 7) for index, session_id in enumerate(ids)
    ]
    results = cluster_store.save_many(updates)
    for index, result in enumerate(results):
        expected = SaveStatus.CONFLICT if index % 3 == 0 else SaveStatus.SAVED
        assert result.status is expected, ids[index]
    loaded = cluster_store.load_many(ids + ["missing"])
    assert [record.position for record in loaded[:-1]] == [0 if index % 3 == 0 else 1 for index in range(60)]
    assert loaded[-1] is None
    assert cluster_store.delete("s1")
    assert cluster_store.load("s1") is None


def test_session_key_is_one_hash_slot(redis_cluster):
    client = redis_cluster.clients[0]
    assert client.cluster("keyslot", session_key("abc")) == client.cluster("keyslot", "abc")


def test_scripts_reload_after_flush(cluster_store, redis_cluster):
    """New or failed-over masters have no scripts; NOSCRIPT replies make the store load them and retry."""
    ids = [f"r{index}" for index in range(30)]
    for session_id in ids:
        assert cluster_store.create(make_record(session_id))
    for client in redis_cluster.clients:
        client.script_flush()
    results = cluster_store.save_many([(make_record(session_id, position=4), 0) for session_id in ids])
    assert all(result.status is SaveStatus.SAVED for result in results)
    for client in redis_cluster.clients:
        client.script_flush()
    assert cluster_store.create(make_record("after-flush"))
    assert cluster_store.load("after-flush").position == 0


def test_unreachable_cluster_is_unavailable():
    store = RedisStore(f"redis+cluster://127.0.0.1:{free_port()}", timeout_s=0.5)
    with pytest.raises(StoreUnavailable, match="redis cluster via 127.0.0.1"):
        store.ping()
    with pytest.raises(StoreUnavailable):
        store.load("s1")
    store.close()


@pytest.mark.parametrize("architecture", ["lstm", "gru"])
def test_chunked_steps_match_offline_on_cluster(start_server, cluster_url, tiny_models_dir, architecture):
    server = start_server(redis_url=cluster_url)
    model_name = f"tiny-{architecture}"
    bundle = load_bundle(tiny_models_dir / model_name)
    tokens = bundle.tokenizer.encode(TEXT)
    expected_inputs, expected_next = reference_logprobs(bundle.model, tokens)
    expected_top = expected_next.topk(10)
    chunkings = {
        "one call": [tokens],
        "one token per call": chunks_of(tokens, 1),
        "chunks of 7": chunks_of(tokens, 7),
        "irregular chunks": irregular_chunks(tokens),
    }
    with Client(server.target, timeout=30) as client:
        for label, pieces in chunkings.items():
            input_logprobs, next_tokens = run_chunks(client, model_name, pieces, top_k=10)
            assert_close(input_logprobs, expected_inputs, f"{architecture} {label} input log-probs")
            assert [item.token_id for item in next_tokens] == expected_top.indices.tolist(), label
            top_logprobs = [item.logprob for item in next_tokens]
            assert_close(top_logprobs, expected_top.values.tolist(), f"{label} top-k")


def test_many_threads_step_many_sessions(start_server, cluster_url, redis_cluster, tiny_models_dir):
    server = start_server(redis_url=cluster_url, max_wait_ms=5.0)
    bundle = load_bundle(tiny_models_dir / "tiny-lstm")
    sessions = 48
    texts = [TEXT[index % 40 :][: 30 + index] for index in range(sessions)]

    def run(index: int):
        tokens = bundle.tokenizer.encode(texts[index])
        sizes = random.Random(index).choices([1, 2, 3, 5, 8], k=len(tokens))
        pieces, start = [], 0
        for size in sizes:
            if start >= len(tokens):
                break
            pieces.append(tokens[start : start + size])
            start += size
        with Client(server.target, timeout=60) as client:
            return tokens, run_chunks(client, "tiny-lstm", pieces, top_k=3)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(run, range(sessions)))
    assert all(count > 0 for count in redis_cluster.keys_per_node()), redis_cluster.keys_per_node()
    for tokens, (input_logprobs, next_tokens) in results:
        expected_inputs, expected_next = reference_logprobs(bundle.model, tokens)
        assert_close(input_logprobs, expected_inputs, f"{len(tokens)} tokens input log-probs")
        assert_close([item.logprob for item in next_tokens], expected_next.topk(3).values.tolist(), "top-k")


def test_cli_serves_from_cluster(tiny_models_dir, cluster_url):
    process = ServeProcess("--models-dir", str(tiny_models_dir), "--redis-url", cluster_url)
    try:
        assert "session store: redis cluster via 127.0.0.1:" in process.log
        with Client(process.target) as client:
            session = client.create_session("tiny-gru", prompt="In the beginning")
            assert session.step(" God").position == len("In the beginning God")
    finally:
        process.stop()
