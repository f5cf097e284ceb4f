"""Faults with real processes: Redis killed and restarted, server killed and restarted, SIGTERM, expiry."""

from __future__ import annotations

import random
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rnnstream_client import Client, NotFoundError, RnnstreamError, UnavailableError

from rnnstream.models.bundle import load_bundle

from .cli_helpers import ServeProcess
from .conftest import RedisProcess
from .consistency import check_state


def health_status(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return reply.status


def wait_for_health(target: str, status: int, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if health_status(target) == status:
            return True
        time.sleep(0.1)
    return False


def step_until_acknowledged(session, chunk: list[int], deadline: float) -> None:
    """Send one step until the server acknowledges it, as a client riding out an outage does."""
    while True:
        try:
            session.step(chunk, top_k=0, retries=0, timeout=5)
            return
        except UnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_redis_restart_during_traffic(tmp_path, start_server, tiny_models_dir):
    redis_process = RedisProcess(tmp_path / "redis", appendonly=True).start()
    try:
        server = start_server(redis_url=redis_process.url, redis_timeout=0.3)
        model = load_bundle(tiny_models_dir / "tiny-gru").model
        texts = [[random.Random(index).randrange(32, 127) for _ in range(120)] for index in range(4)]
        with Client(server.target) as client:
            ids = [client.create_session("tiny-gru").id for _ in texts]
        failures: list[BaseException] = []

        def traffic(index: int) -> None:
            try:
                with Client(server.target) as client:
                    session = client.session(ids[index], position=0)
                    deadline = time.monotonic() + 60
                    for start in range(0, len(texts[index]), 3):
                        step_until_acknowledged(session, texts[index][start : start + 3], deadline)
                        time.sleep(0.01)
            except BaseException as error:  # noqa: BLE001 - reported by the main thread
                failures.append(error)

        threads = [threading.Thread(target=traffic, args=(index,)) for index in range(len(texts))]
        for thread in threads:
            thread.start()
        time.sleep(0.4)

        redis_process.stop()
        assert wait_for_health(server.target, health_pb2.HealthCheckResponse.NOT_SERVING)
        with Client(server.target) as client:
            started = time.monotonic()
            with pytest.raises(UnavailableError):
                client.session(ids[0]).info()
            assert time.monotonic() - started < 5, "a call during the outage hung"
        time.sleep(0.5)

        redis_process.start()
        assert wait_for_health(server.target, health_pb2.HealthCheckResponse.SERVING)
        for thread in threads:
            thread.join(90)
        assert not failures, failures
        with Client(server.target) as client:
            for session_id, text in zip(ids, texts):
                check_state(client, session_id, model, text)
    finally:
        redis_process.stop()


def test_server_killed_mid_stream_then_restarted(tiny_models_dir, redis_url):
    model = load_bundle(tiny_models_dir / "tiny-lstm").model
    text = [random.Random(5).randrange(32, 127) for _ in range(400)]
    first = ServeProcess("--models-dir", str(tiny_models_dir), "--redis-url", redis_url)
    client = Client(first.target, timeout=10)
    session = client.create_session("tiny-lstm")
    cut_at = None
    try:
        with session.stream() as stream:
            for start in range(0, len(text), 2):
                if start == 100:
                    first.process.kill()
                stream.step(text[start : start + 2])
    except RnnstreamError:
        cut_at = session.position
    finally:
        first.stop()
        client.close()
    assert cut_at is not None and cut_at >= 100, "the stream did not break when the server was killed"

    second = ServeProcess("--models-dir", str(tiny_models_dir), "--redis-url", redis_url)
    try:
        with Client(second.target, timeout=10) as client:
            resumed = client.session(session.id, position=session.position)
            while resumed.position < len(text):
                # The first step may already have been applied before the kill; the retry is replayed.
                resumed.step(text[resumed.position : resumed.position + 2])
            check_state(client, session.id, model, text)
    finally:
        second.stop()


def test_sigterm_drains_in_flight_generation(tiny_models_dir, redis_url):
    process = ServeProcess("--models-dir", str(tiny_models_dir), "--redis-url", redis_url, "--grace", "20")
    chunks = []
    try:
        with Client(process.target, timeout=60) as client:
            session = client.create_session("tiny-gru", prompt="Draining")
            stream = session.generate(max_tokens=400, seed=1)
            chunks.append(next(stream))
            process.process.terminate()
            chunks.extend(stream)
            assert process.process.wait(30) == 0
    finally:
        process.stop()
    assert chunks[-1].finish_reason == "length"
    assert sum(len(chunk.token_ids) for chunk in chunks) == 400
    assert "stopping: draining in-flight calls" in process.log


def test_idle_ttl_is_refreshed_then_expires(start_server, redis_url):
    server = start_server(redis_url=redis_url, default_ttl=2)
    with Client(server.target) as client:
        session = client.create_session("tiny-gru", prompt="abc")
        for _ in range(4):
            time.sleep(0.8)
            session.step("d")
        assert session.info().ttl_remaining_seconds > 1.0
        time.sleep(3.0)
        with pytest.raises(NotFoundError):
            session.step("e")
        with pytest.raises(NotFoundError):
            session.info()


def test_memory_store_session_expires(start_server):
    server = start_server(default_ttl=1)
    with Client(server.target) as client:
        session = client.create_session("tiny-lstm", prompt="abc")
        time.sleep(1.5)
        with pytest.raises(NotFoundError):
            session.step("d")


def test_read_only_redis_is_unavailable(tmp_path, start_server):
    """A Redis that became a replica rejects writes: UNAVAILABLE and NOT_SERVING, then recovery."""
    import redis as redis_client

    redis_process = RedisProcess(tmp_path / "redis").start()
    try:
        server = start_server(redis_url=redis_process.url, redis_timeout=0.5)
        with Client(server.target) as client:
            session = client.create_session("tiny-gru", prompt="abc")
            connection = redis_client.Redis(port=redis_process.port)
            connection.replicaof("127.0.0.1", 1)  # nothing listens on port 1; the data stays
            try:
                with pytest.raises(UnavailableError, match="(?i)read.only"):
                    session.step("d", retries=0)
                with pytest.raises(UnavailableError):
                    client.create_session("tiny-gru")
                assert wait_for_health(server.target, health_pb2.HealthCheckResponse.NOT_SERVING)
            finally:
                connection.replicaof("NO", "ONE")
                connection.close()
            assert wait_for_health(server.target, health_pb2.HealthCheckResponse.SERVING)
            assert session.step("d").position == 4
    finally:
        redis_process.stop()
