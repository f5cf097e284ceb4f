"""Conversion between engine results and protobuf messages."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp
from rnnstream_client._proto.rnnstream.v1 import rnnstream_pb2 as pb

from ..engine.sessions import ServedModel, top_k_of
from ..state.record import SessionRecord


def timestamp(ms: int) -> Timestamp:
    value = Timestamp()
    value.FromMilliseconds(ms)
    return value


def session_info(record: SessionRecord) -> pb.SessionInfo:
    remaining = record.ttl_remaining_ms / 1000.0 if record.ttl_remaining_ms >= 0 else float(record.ttl_s)
    return pb.SessionInfo(
        session_id=record.session_id,
        model=record.model,
        position=record.position,
        ttl_seconds=record.ttl_s,
        ttl_remaining_seconds=remaining,
        created_at=timestamp(record.created_ms),
        updated_at=timestamp(record.updated_ms),
        fingerprint=record.fingerprint,
    )


def predictions(model: ServedModel, next_logprobs, k: int) -> list[pb.TokenPrediction]:
    tokenizer = model.bundle.tokenizer
    return [
        pb.TokenPrediction(
            token_id=token,
            text=tokenizer.decode([token]),
            token_bytes=tokenizer.token_bytes(token),
            logprob=logprob,
        )
        for token, logprob in top_k_of(next_logprobs, k)
    ]


def model_info(model: ServedModel) -> pb.ModelInfo:
    config = model.bundle.config
    return pb.ModelInfo(
        name=model.name,
        architecture=config.architecture,
        vocab_size=config.vocab_size,
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        embedding_size=config.embedding_size,
        state_size_bytes=model.runner.state_nbytes,
        device=str(model.runner.device),
        fingerprint=model.bundle.fingerprint,
        parameters=model.bundle.model.num_parameters(),
        tokenizer=model.bundle.tokenizer.kind,
    )
