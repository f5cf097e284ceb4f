"""What the server is measured against: the model in-process, Redis round trips, and prefill.

- model ceiling: ModelRunner.step on packed states at a fixed batch size, in
  this process, with no server and no store. It is the most tokens per second
  the model reaches at that batch size on this machine.
- Redis round trip: HGETALL of a hash holding one state-size value, and PING.
  A step costs two round trips, one to load its batch's states and one to
  store them.
- prefill: one Step call with a long text through the server, against the
  model's forward pass over the same tokens in this process.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from .loadgen import SAMPLE_TEXT
from .report import latency_summary_ms

logger = logging.getLogger(__name__)

PREFILL_CHARS = 2000
REDIS_BENCH_KEY = "rnnstream:bench:{round-trip}"


def find_bundle(models_dir: Path, name: str):
    """Load the bundle named `name` from models_dir; raise ValueError when there is none."""
    from ..models.bundle import find_bundles, load_bundle

    names = []
    for path in find_bundles(models_dir):
        bundle = load_bundle(path)
        if bundle.name == name:
            return bundle
        names.append(bundle.name)
    raise ValueError(f"model {name!r} not found in {models_dir}; bundles there: {', '.join(names) or 'none'}")


def sample_tokens(count: int) -> list[int]:
    """Return `count` byte tokens of the sample text, repeated as needed (the text is ASCII: one token per character)."""
    data = SAMPLE_TEXT.encode("ascii")
    repeats = count // len(data) + 1
    return list((data * repeats)[:count])


@dataclass
class TimedLoop:
    """Durations of the calls of a loop timed for a fixed window after a warmup."""

    durations_s: list[float]
    window_s: float


def time_loop(call, duration_s: float, warmup_s: float, min_calls: int = 1) -> TimedLoop:
    """Call `call()` for warmup_s, then time each call until duration_s has passed and at least min_calls ran."""
    deadline = time.perf_counter() + warmup_s
    while time.perf_counter() < deadline:
        call()
    durations = []
    started = time.perf_counter()
    end = started + duration_s
    while True:
        before = time.perf_counter()
        if before >= end and len(durations) >= min_calls:
            break
        call()
        durations.append(time.perf_counter() - before)
    return TimedLoop(durations, time.perf_counter() - started)


def model_ceiling(
    models_dir: Path, model: str, batch: int, duration_s: float, warmup_s: float, device: str = "cpu"
) -> dict:
    """Time ModelRunner.step with `batch` sessions of one token each, states fed back as the server does."""
    if batch < 1:
        raise ValueError(f"invalid batch size {batch}; must be at least 1")
    import torch

    from ..engine.runner import ModelRunner, resolve_device
    from ..state.codec import zero_state

    bundle = find_bundle(models_dir, model)
    runner = ModelRunner(bundle, resolve_device(device))
    tokens = [token % bundle.config.vocab_size for token in sample_tokens(4096)]
    states = [zero_state(runner.state_shape)] * batch
    cursor = 0

    def step() -> None:
        nonlocal states, cursor
        inputs = [[tokens[(cursor + 97 * row) % len(tokens)]] for row in range(batch)]
        states = [output.state for output in runner.step(inputs, states)]
        cursor += 1

    loop = time_loop(step, duration_s, warmup_s)
    steps = len(loop.durations_s)
    return {
        "kind": "model_ceiling",
        "model": model,
        "architecture": bundle.config.architecture,
        "device": str(runner.device),
        "torch_threads": torch.get_num_threads(),
        "batch_size": batch,
        "window_s": loop.window_s,
        "steps": steps,
        "tokens": steps * batch,
        "tokens_per_s": steps * batch / sum(loop.durations_s),
        "step_latency_ms": latency_summary_ms(loop.durations_s),
    }


def redis_round_trip(url: str, state_bytes: int, duration_s: float, warmup_s: float) -> dict:
    """Time HGETALL of a hash with one `state_bytes` value, and PING, each for duration_s; delete the hash after."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=5.0)
    try:
        client.hset(REDIS_BENCH_KEY, mapping={"state": bytes(state_bytes), "position": "0"})
        client.expire(REDIS_BENCH_KEY, 600)
        hgetall = time_loop(lambda: client.hgetall(REDIS_BENCH_KEY), duration_s, warmup_s)
        ping = time_loop(client.ping, duration_s / 2, warmup_s / 2)
        client.delete(REDIS_BENCH_KEY)
    finally:
        client.close()
    return {
        "kind": "redis_round_trip",
        "state_bytes": state_bytes,
        "hgetall_ms": latency_summary_ms(hgetall.durations_s),
        "ping_ms": latency_summary_ms(ping.durations_s),
    }


def prefill(
    target: str,
    models_dir: Path,
    model: str,
    chars: int = PREFILL_CHARS,
    repeats: int = 5,
    timeout_s: float = 60.0,
    device: str = "cpu",
) -> dict:
    """Time a `chars`-token text in one Step call through the server, then the model's forward pass over it here.

    Each side runs once untimed, then `repeats` times; the medians are compared.
    """
    import grpc
    import torch
    from rnnstream_client._proto.rnnstream.v1 import rnnstream_pb2 as pb
    from rnnstream_client._proto.rnnstream.v1 import rnnstream_pb2_grpc as pb_grpc

    from ..engine.runner import resolve_device

    if repeats < 1:
        raise ValueError(f"invalid repeat count {repeats}; must be at least 1")
    tokens = sample_tokens(chars)
    text = bytes(tokens).decode("ascii")

    server_s = []
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.RnnStreamStub(channel)
        for attempt in range(repeats + 1):
            try:
                session = stub.CreateSession(pb.CreateSessionRequest(model=model, top_k=0), timeout=timeout_s)
                started = time.perf_counter()
                reply = stub.Step(pb.StepRequest(session_id=session.session_id, text=text), timeout=timeout_s)
                elapsed = time.perf_counter() - started
                stub.DeleteSession(pb.DeleteSessionRequest(session_id=session.session_id), timeout=timeout_s)
            except grpc.RpcError as error:
                raise RuntimeError(f"prefill on {target} failed: {error.code().name}: {error.details()}") from error
            if reply.position != chars:
                raise RuntimeError(f"prefill step ended at position {reply.position}, expected {chars}")
            if attempt:
                server_s.append(elapsed)

    bundle = find_bundle(models_dir, model)
    torch_device = resolve_device(device)
    network = bundle.model.to(torch_device).eval()
    inputs = torch.tensor([tokens], dtype=torch.long, device=torch_device)  # (1, T)
    raw_s = []
    with torch.inference_mode():
        for attempt in range(repeats + 1):
            state = network.initial_state(1, device=torch_device)
            started = time.perf_counter()
            logits, _ = network(inputs, state)  # (1, T, V)
            logits.cpu()
            elapsed = time.perf_counter() - started
            if attempt:
                raw_s.append(elapsed)

    server_ms = latency_summary_ms(server_s)
    raw_ms = latency_summary_ms(raw_s)
    return {
        "kind": "prefill",
        "model": model,
        "architecture": bundle.config.architecture,
        "tokens": chars,
        "repeats": repeats,
        "server_ms": server_ms,
        "raw_forward_ms": raw_ms,
        "server_tokens_per_s": chars / (server_ms["p50"] / 1000),
        "raw_tokens_per_s": chars / (raw_ms["p50"] / 1000),
        "server_to_raw": raw_ms["p50"] / server_ms["p50"],
    }
