"""Token generation: sample a token, apply it to the session, then stream it.

Each iteration is one ordinary step of the session, so it joins the model's
batch with every other session's steps, and generations join and leave the
batch between iterations. A token is sent only after its step is stored, so
every token a client receives is part of the session. If the client cancels
while a token's step is in flight, the step is rolled back once it completes,
so the session keeps exactly the tokens that were sent.
"""

from __future__ import annotations

import asyncio
import codecs
import dataclasses
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch

from ..errors import InvalidArgument
from ..state.record import SessionRecord
from ..state.store import now_ms
from .sampling import SamplingParams, sample_token
from .sessions import ServedModel, SessionManager

logger = logging.getLogger(__name__)

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256


@dataclass(frozen=True)
class GenerateParams:
    max_tokens: int
    sampling: SamplingParams
    seed: int | None
    stop: tuple[str, ...]


@dataclass(frozen=True)
class GeneratedToken:
    token_id: int
    text: str  # decoded text this token completes; empty while a UTF-8 character is incomplete
    logprob: float
    position: int  # session position after this token, which is already stored


@dataclass(frozen=True)
class GenerationEnd:
    finish_reason: str  # "length" or "stop"
    position: int
    text: str = ""  # bytes held back at the end, decoded with replacement characters


def validate_params(
    manager: SessionManager,
    model: ServedModel,
    max_tokens: int,
    temperature: float | None,
    top_k: int,
    top_p: float | None,
    seed: int | None,
    stop: list[str],
) -> GenerateParams:
    limit = manager.limits.max_generate_tokens
    if not 1 <= max_tokens <= limit:
        raise InvalidArgument(f"max_tokens {max_tokens} is out of range; allowed 1 to {limit}")
    temperature = 1.0 if temperature is None else temperature
    if not 0.0 <= temperature <= 100.0:
        raise InvalidArgument(f"temperature {temperature} is out of range; allowed 0 to 100")
    vocab = model.bundle.config.vocab_size
    if top_k > vocab:
        raise InvalidArgument(f"top_k {top_k} is out of range; model {model.name} allows 0 to {vocab}")
    top_p = 1.0 if top_p is None else top_p
    if not 0.0 < top_p <= 1.0:
        raise InvalidArgument(f"top_p {top_p} is out of range; allowed greater than 0 up to 1")
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidArgument(f"{len(stop)} stop strings exceeds the maximum of {MAX_STOP_STRINGS}")
    for text in stop:
        if not 1 <= len(text) <= MAX_STOP_LENGTH:
            raise InvalidArgument(f"stop string {text[:40]!r} must have 1 to {MAX_STOP_LENGTH} characters")
    return GenerateParams(max_tokens, SamplingParams(temperature, top_k, top_p), seed, tuple(stop))


async def generate(
    manager: SessionManager,
    model: ServedModel,
    session_id: str,
    prompt: list[int],
    expected_position: int | None,
    params: GenerateParams,
) -> AsyncIterator[GeneratedToken | GenerationEnd]:
    """Yield each sampled token as it is produced, then one GenerationEnd."""
    started = time.monotonic()
    labels = (model.name, model.architecture, str(model.runner.device))
    observer = manager.observer
    generator = torch.Generator().manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
    tokenizer = model.bundle.tokenizer
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    longest_stop = max((len(text) for text in params.stop), default=0)
    text_tail = ""

    result = await manager.apply(model, session_id, prompt, expected_position)  # prompt, or a read of the state
    last_sent = started
    for index in range(params.max_tokens):
        logprobs = result.next_logprobs
        token = sample_token(logprobs, params.sampling, generator)
        before = result.record
        step = asyncio.ensure_future(manager.apply(model, session_id, [token], before.position))
        try:
            result = await asyncio.shield(step)
        except asyncio.CancelledError:
            await _roll_back(manager, step, before)
            raise
        position = result.record.position

        text = decoder.decode(tokenizer.token_bytes(token))
        yield GeneratedToken(token, text, float(logprobs[token]), position)
        now = time.monotonic()
        observer.generated_token(*labels, now - last_sent, index == 0)
        last_sent = now

        if params.stop:
            text_tail = (text_tail + text)[-(longest_stop + 8) :]
            if any(stop in text_tail for stop in params.stop):
                yield GenerationEnd("stop", position, decoder.decode(b"", final=True))
                return
    yield GenerationEnd("length", result.record.position, decoder.decode(b"", final=True))


async def _roll_back(manager: SessionManager, step: asyncio.Future, before: SessionRecord) -> None:
    """Undo a cancelled generation's in-flight step once it completes, unless the session moved on since."""
    try:
        applied = await step
    except Exception:  # noqa: BLE001 - a failed step changed nothing
        return
    restored = dataclasses.replace(before, updated_ms=now_ms(), reply_tag="", reply=b"", ttl_remaining_ms=-1)
    outcome = await asyncio.to_thread(manager.store.save, restored, applied.record.position)
    logger.debug("generation on session %s cancelled; rolled back one token: %s", before.session_id, outcome.status)

