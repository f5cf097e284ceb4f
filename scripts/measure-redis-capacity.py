#!/usr/bin/env python3
"""Measure how many sessions of each model fit in a GiB of Redis memory.

Starts its own redis-server (no persistence) on a free loopback port and an
rnnstream server on the given models, then for each model creates --sessions
sessions through gRPC and steps each once with --input-tokens tokens. Redis's
INFO memory `used_memory` is read before, after the creates and after the
steps. A session that has been stepped also stores its last reply (for the
retry of a lost response), so it is larger than a new one.

    python scripts/measure-redis-capacity.py --sessions 20000

Prints a Markdown table; --json FILE also writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import redis
from rnnstream_client._proto.rnnstream.v1 import rnnstream_pb2 as pb
from rnnstream_client._proto.rnnstream.v1 import rnnstream_pb2_grpc as pb_grpc

from rnnstream.api.server import build_server
from rnnstream.config import BUNDLED_MODELS_DIR, ServerConfig
from rnnstream.state.redis_store import session_key

GIB = 1024**3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_redis(directory: Path) -> tuple[subprocess.Popen, int]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not installed (Debian: apt-get install redis-server)")
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(directory)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.exceptions.ConnectionError:
            if process.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"redis-server on port {port} did not start")
            time.sleep(0.05)
    client.close()
    return process, port


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


async def run_all(calls, concurrency: int) -> None:
    """Await the coroutine factories in `calls`, at most `concurrency` at a time."""
    queue = iter(calls)

    async def worker() -> None:
        for call in queue:
            await call()

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def measure_model(
    stub, store: redis.Redis, model: pb.ModelInfo, sessions: int, input_tokens: int, concurrency: int
) -> dict:
    store.flushall()
    baseline = used_memory(store)
    session_ids: list[str] = []

    async def create() -> None:
        request = pb.CreateSessionRequest(model=model.name, ttl_seconds=3600)
        reply = await stub.CreateSession(request, timeout=60)
        session_ids.append(reply.session_id)

    started = time.monotonic()
    await run_all((create for _ in range(sessions)), concurrency)
    after_create = used_memory(store)
    tokens = [(index * 37 + 11) % model.vocab_size for index in range(input_tokens)]

    def step(session_id: str):
        request = pb.StepRequest(session_id=session_id, token_ids=tokens, expected_position=0)
        return lambda: stub.Step(request, timeout=60)

    await run_all((step(session_id) for session_id in session_ids), concurrency)
    after_step = used_memory(store)
    seconds = time.monotonic() - started

    keys = store.dbsize()
    if keys != sessions:
        raise RuntimeError(f"expected {sessions} sessions in Redis, found {keys} keys")
    # SAMPLES 0: count every field; the default estimates a hash's size from 5 fields.
    sample = [store.memory_usage(session_key(session_id), samples=0) for session_id in session_ids[:200]]
    created_bytes = (after_create - baseline) / sessions
    stepped_bytes = (after_step - baseline) / sessions
    return {
        "model": model.name,
        "architecture": model.architecture,
        "state_bytes": model.state_size_bytes,
        "sessions": sessions,
        "input_tokens": input_tokens,
        "used_memory_baseline": baseline,
        "used_memory_after_create": after_create,
        "used_memory_after_step": after_step,
        "bytes_per_created_session": round(created_bytes),
        "bytes_per_stepped_session": round(stepped_bytes),
        "memory_usage_per_key_sample": round(sum(sample) / len(sample)),
        "created_sessions_per_gib": int(GIB / created_bytes),
        "stepped_sessions_per_gib": int(GIB / stepped_bytes),
        "seconds": round(seconds, 1),
    }


async def main_async(args: argparse.Namespace) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="rnnstream-capacity-") as directory:
        redis_process, redis_port = start_redis(Path(directory))
        store = redis.Redis(host="127.0.0.1", port=redis_port)
        config = ServerConfig(
            models_dir=args.models_dir,
            port=0,
            redis_url=f"redis://127.0.0.1:{redis_port}/0",
            device=args.device,
        )
        app = await build_server(config)
        results = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
                stub = pb_grpc.RnnStreamStub(channel)
                models = (await stub.ListModels(pb.ListModelsRequest(), timeout=30)).models
                for model in models:
                    if args.model and model.name not in args.model:
                        continue
                    result = await measure_model(
                        stub, store, model, args.sessions, args.input_tokens, args.concurrency
                    )
                    print(f"measured {model.name}: {result}", file=sys.stderr)
                    results.append(result)
        finally:
            await app.stop(0)
            store.close()
            redis_process.kill()
            redis_process.wait(10)
    return results


def markdown(results: list[dict], redis_version: str) -> str:
    lines = [
        "| model | state bytes | sessions | bytes per new session | new sessions per GiB "
        "| bytes per stepped session | stepped sessions per GiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        lines.append(
            f"| {result['model']} | {result['state_bytes']:,} | {result['sessions']:,} "
            f"| {result['bytes_per_created_session']:,} | {result['created_sessions_per_gib']:,} "
            f"| {result['bytes_per_stepped_session']:,} | {result['stepped_sessions_per_gib']:,} |"
        )
    lines.append("")
    lines.append(f"redis-server {redis_version}; a stepped session took one Step of "
                 f"{results[0]['input_tokens'] if results else 0} tokens.")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=20000, help="sessions per model (default 20000)")
    parser.add_argument(
        "--input-tokens", type=int, default=16, help="tokens in each session's one step (default 16)"
    )
    parser.add_argument("--concurrency", type=int, default=64, help="calls in flight at once (default 64)")
    parser.add_argument("--models-dir", type=Path, default=BUNDLED_MODELS_DIR, help="model bundles to serve")
    parser.add_argument("--model", action="append", help="measure only this model (repeatable)")
    parser.add_argument("--device", default="cpu", help="device of the server's models (default cpu)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args()

    results = asyncio.run(main_async(args))
    version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()[2]
    print(markdown(results, version.removeprefix("v=")))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
