"""Token generation: sample, stream, then apply each token to the session.

Each iteration is one ordinary step of the session, so it joins the model's
batch with every other session's steps, and generations join and leave the
batch between iterations. A token is sent to the client before its step is
applied, and the step is shielded from cancellation, so a client that cancels
leaves the session advanced by exactly the tokens it was sent.
"""

from __future__ import annotations

import asyncio
import codecs
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch

from ..errors import InvalidArgument
from .sampling import SamplingParams, sample_token
from .sessions import ServedModel, SessionManager

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
    position: int  # session position once this token is applied


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
    position = result.record.position
    logprobs = result.next_logprobs
    last_sent = started
    for index in range(params.max_tokens):
        token = sample_token(logprobs, params.sampling, generator)
        text = decoder.decode(tokenizer.token_bytes(token))
        yield GeneratedToken(token, text, float(logprobs[token]), position + 1)

        now = time.monotonic()
        observer.generated_token(*labels, now - last_sent, index == 0)
        last_sent = now
        # Shielded: once a token is sent, its step completes even if the client cancels now.
        result = await asyncio.shield(manager.apply(model, session_id, [token], position))
        position = result.record.position
        logprobs = result.next_logprobs

        if params.stop:
            text_tail = (text_tail + text)[-(longest_stop + 8) :]
            if any(stop in text_tail for stop in params.stop):
                yield GenerationEnd("stop", position, decoder.decode(b"", final=True))
                return
    yield GenerationEnd("length", position, decoder.decode(b"", final=True))

