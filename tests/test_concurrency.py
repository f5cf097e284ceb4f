"""Concurrent steps on shared sessions, through one or two replicas: no lost or doubled tokens."""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
import threading
import time

import pytest
from rnnstream_client import Client
from rnnstream_client import aio

from rnnstream.models.bundle import load_bundle

from .consistency import Acknowledged, check_replies, check_state


def random_chunks(rng: random.Random, count: int, total: int) -> list[list[int]]:
    tokens = [rng.randrange(32, 127) for _ in range(total)]
    chunks, index = [], 0
    while index < len(tokens):
        size = rng.randint(1, 3)
        chunks.append(tokens[index : index + size])
        index += size
    return chunks


@pytest.mark.parametrize("architecture", ["lstm", "gru"])
def test_two_replicas_race_on_one_session(start_server, redis_url, tiny_models_dir, architecture):
    replicas = [start_server(redis_url=redis_url), start_server(redis_url=redis_url)]
    model_name = f"tiny-{architecture}"
    model = load_bundle(tiny_models_dir / model_name).model
    with Client(replicas[0].target) as client:
        session_id = client.create_session(model_name).id

    def worker(index: int) -> list[Acknowledged]:
        rng = random.Random(index)
        replies = []
        with Client(replicas[index % 2].target) as client:
            session = client.session(session_id)  # no expected position: steps race freely
            for chunk in random_chunks(rng, 0, 30):
                result = session.step(chunk, top_k=0)
                session.position = None
                replies.append(Acknowledged(chunk, result.position, result.input_logprobs))
        return replies

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = [reply for batch in pool.map(worker, range(8)) for reply in batch]
    tokens = check_replies(model, [], replies)
    assert len(tokens) == 8 * 30
    with Client(replicas[1].target) as client:
        check_state(client, session_id, model, tokens)


def test_stress_many_sessions_many_clients(start_server, redis_url, tiny_models_dir):
    """50 sessions, 8 concurrent clients each, 100 tokens per session, over two replicas."""
    replicas = [start_server(redis_url=redis_url), start_server(redis_url=redis_url)]
    model = load_bundle(tiny_models_dir / "tiny-gru").model
    sessions, clients_per_session, tokens_per_session = 50, 8, 100

    async def run():
        clients = [aio.Client(replica.target, timeout=60) for replica in replicas]
        ids = [(await clients[0].create_session("tiny-gru")).id for _ in range(sessions)]
        rng = random.Random(7)
        plans = []
        for session_index in range(sessions):
            chunks = random_chunks(rng, 0, tokens_per_session)
            for client_index in range(clients_per_session):
                plans.append((session_index, client_index, chunks[client_index::clients_per_session]))

        async def client_loop(session_index, client_index, chunks):
            client = clients[(session_index + client_index) % 2]
            replies = []
            for chunk in chunks:
                session = client.session(ids[session_index])
                result = await session.step(chunk, top_k=0)
                replies.append(Acknowledged(chunk, result.position, result.input_logprobs))
            return session_index, replies

        results = await asyncio.gather(*(client_loop(*plan) for plan in plans))
        for client in clients:
            await client.close()
        return ids, results

    ids, results = asyncio.run(run())
    by_session: dict[int, list[Acknowledged]] = {}
    for session_index, replies in results:
        by_session.setdefault(session_index, []).extend(replies)
    with Client(replicas[0].target) as client:
        for session_index, replies in by_session.items():
            tokens = check_replies(model, [], replies)
            assert len(tokens) == tokens_per_session
            check_state(client, ids[session_index], model, tokens)


def test_deadlines_leave_sessions_whole(start_server, redis_url, tiny_models_dir):
    """Steps cut off by tiny deadlines either applied fully or not at all, and batch-mates are unaffected."""
    server = start_server(redis_url=redis_url, max_wait_ms=5.0)
    model = load_bundle(tiny_models_dir / "tiny-lstm").model

    def worker(index: int) -> tuple[str, list[int]]:
        rng = random.Random(100 + index)
        text = [rng.randrange(32, 127) for _ in range(60)]
        with Client(server.target) as client:
            session = client.create_session("tiny-lstm")
            while session.position < len(text):
                chunk = text[session.position : session.position + 4]
                try:
                    session.step(chunk, top_k=0, retries=0, timeout=rng.choice([0.0005, 0.002, 5.0]))
                except Exception:  # noqa: BLE001 - a deadline or a replayed mismatch; re-read and go on
                    session.position = session.info().position
            return session.id, text

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(worker, range(6)))
    with Client(server.target) as client:
        for session_id, text in results:
            check_state(client, session_id, model, text)


def test_bad_session_fails_alone_in_batch(start_server, redis_url):
    import redis as redis_client
    from rnnstream_client import FailedPreconditionError

    server = start_server(redis_url=redis_url, max_wait_ms=50.0)
    with Client(server.target) as client:
        sessions = [client.create_session("tiny-lstm", prompt="abc") for _ in range(8)]
    connection = redis_client.Redis.from_url(redis_url)
    connection.hset(f"rnnstream:session:{{{sessions[3].id}}}", "state", b"\x00" * 10)
    connection.close()

    def step(session):
        with Client(server.target) as client:
            try:
                return client.session(session.id, position=3).step("d").position
            except FailedPreconditionError as error:
                return error

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(step, sessions))
    assert isinstance(results[3], FailedPreconditionError)
    assert "10 bytes" in results[3].details
    assert results[:3] + results[4:] == [4] * 7


def test_long_input_does_not_starve_unbatched_server(start_server, redis_url):
    """With max batch 1, a long input runs in chunks that alternate with other sessions' steps."""
    server = start_server(redis_url=redis_url, max_batch=1, max_chunk_tokens=4)
    finished: list[str] = []

    def long_step():
        with Client(server.target, timeout=120) as client:
            client.create_session("tiny-lstm").step("x" * 8000, top_k=0)
            finished.append("long")

    with Client(server.target) as client:
        short = client.create_session("tiny-gru")
        thread = threading.Thread(target=long_step)
        thread.start()
        time.sleep(0.3)
        assert not finished, "the long step ended before the short ones started; make it longer"
        for _ in range(3):
            short.step("ab", top_k=0)
        finished.append("short")
        thread.join(120)
    assert finished == ["short", "long"]
