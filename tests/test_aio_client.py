"""The asyncio SDK mirrors the synchronous one against a real server."""

from __future__ import annotations

import asyncio

import pytest
from rnnstream_client import Client, NotFoundError
from rnnstream_client import aio


def test_async_session_matches_sync(server):
    async def run():
        async with aio.Client(server.target) as client:
            models = await client.list_models()
            session = await client.create_session("tiny-gru", prompt="Hello")
            result = await session.step(" world", top_k=3)
            info = await session.info()
            chunks = [chunk async for chunk in session.generate(max_tokens=8, seed=2)]
            async with session.stream() as stream:
                streamed = await stream.step("!", top_k=3)
            fork = await session.fork()
            blob = await session.export_state()
            imported = await client.import_state(blob)
            await session.delete()
            with pytest.raises(NotFoundError):
                await session.info()
            return models, result, info, chunks, streamed, fork, imported

    models, result, info, chunks, streamed, fork, imported = asyncio.run(run())
    assert {model.architecture for model in models} == {"lstm", "gru"}
    assert info.position == 11
    assert chunks[-1].position == 19
    assert streamed.position == 20
    assert fork.position == 20
    assert imported.position == 20

    with Client(server.target) as client:
        sync_result = client.create_session("tiny-gru", prompt="Hello").step(" world", top_k=3)
        sync_chunks = list(client.create_session("tiny-gru", prompt="Hello world").generate(max_tokens=8, seed=2))
    assert result == sync_result
    assert [chunk.token_ids for chunk in chunks] == [chunk.token_ids for chunk in sync_chunks]


def test_async_many_sessions_concurrently(server):
    async def run():
        async with aio.Client(server.target) as client:
            sessions = [await client.create_session("tiny-lstm") for _ in range(32)]
            for _ in range(5):
                await asyncio.gather(*(session.step("ab") for session in sessions))
            return [session.position for session in sessions]

    assert asyncio.run(run()) == [10] * 32


def test_async_generate_break_cancels_at_once(server):
    async def run():
        async with aio.Client(server.target) as client:
            session = await client.create_session("tiny-gru", prompt="Hello")
            count = 0
            async for _ in session.generate(max_tokens=400, seed=3):
                count += 1
                if count == 3:
                    break
            position_after_break = session.position
            result = await session.step(" again")
            await asyncio.sleep(0.3)
            info = await session.info()
            return position_after_break, result, info

    position_after_break, result, info = asyncio.run(run())
    assert position_after_break is None
    assert info.position == result.position
    assert result.position < 5 + 400 + 6, "generation went on after the break"
