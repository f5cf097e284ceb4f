"""Typed results of SDK calls."""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from ._proto.rnnstream.v1 import rnnstream_pb2 as pb


@dataclass(frozen=True)
class ModelInfo:
    name: str
    architecture: str
    vocab_size: int
    num_layers: int
    hidden_size: int
    embedding_size: int
    state_size_bytes: int
    device: str
    fingerprint: str
    parameters: int
    tokenizer: str

    @classmethod
    def from_proto(cls, message: pb.ModelInfo) -> "ModelInfo":
        return cls(
            name=message.name,
            architecture=message.architecture,
            vocab_size=message.vocab_size,
            num_layers=message.num_layers,
            hidden_size=message.hidden_size,
            embedding_size=message.embedding_size,
            state_size_bytes=message.state_size_bytes,
            device=message.device,
            fingerprint=message.fingerprint,
            parameters=message.parameters,
            tokenizer=message.tokenizer,
        )


@dataclass(frozen=True)
class TokenPrediction:
    token_id: int
    text: str
    token_bytes: bytes
    logprob: float

    @classmethod
    def from_proto(cls, message: pb.TokenPrediction) -> "TokenPrediction":
        return cls(message.token_id, message.text, message.token_bytes, message.logprob)


@dataclass(frozen=True)
class StepResult:
    """Result of feeding input to a session."""

    position: int
    next_tokens: list[TokenPrediction]
    input_logprobs: list[float]
    input_token_ids: list[int]

    @classmethod
    def from_proto(cls, message) -> "StepResult":
        return cls(
            position=message.position,
            next_tokens=[TokenPrediction.from_proto(item) for item in message.next_tokens],
            input_logprobs=list(message.input_logprobs),
            input_token_ids=list(message.input_token_ids),
        )


@dataclass(frozen=True)
class SessionInfo:
    session_id: str
    model: str
    position: int
    ttl_seconds: int
    ttl_remaining_seconds: float
    created_at: datetime.datetime
    updated_at: datetime.datetime
    fingerprint: str

    @classmethod
    def from_proto(cls, message: pb.SessionInfo) -> "SessionInfo":
        return cls(
            session_id=message.session_id,
            model=message.model,
            position=message.position,
            ttl_seconds=message.ttl_seconds,
            ttl_remaining_seconds=message.ttl_remaining_seconds,
            created_at=message.created_at.ToDatetime(tzinfo=datetime.timezone.utc),
            updated_at=message.updated_at.ToDatetime(tzinfo=datetime.timezone.utc),
            fingerprint=message.fingerprint,
        )


@dataclass(frozen=True)
class GenerateChunk:
    """Part of a Generate stream: sampled tokens, or the final message with `finish_reason` set."""

    token_ids: list[int]
    text: str
    logprobs: list[float]
    position: int
    finish_reason: str

    @classmethod
    def from_proto(cls, message: pb.GenerateResponse) -> "GenerateChunk":
        return cls(
            token_ids=list(message.token_ids),
            text=message.text,
            logprobs=list(message.logprobs),
            position=message.position,
            finish_reason=message.finish_reason,
        )
