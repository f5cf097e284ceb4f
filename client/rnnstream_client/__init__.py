"""Python SDK for rnnstream servers: sessions over LSTM and GRU language models."""

from .client import Client, Session, SessionStream
from .errors import (
    AlreadyExistsError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PositionMismatchError,
    ResourceExhaustedError,
    RnnstreamError,
    UnavailableError,
)
from .types import GenerateChunk, ModelInfo, SessionInfo, StepResult, TokenPrediction

__all__ = [
    "AlreadyExistsError",
    "Client",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "GenerateChunk",
    "InvalidArgumentError",
    "ModelInfo",
    "NotFoundError",
    "PositionMismatchError",
    "ResourceExhaustedError",
    "RnnstreamError",
    "Session",
    "SessionInfo",
    "SessionStream",
    "StepResult",
    "TokenPrediction",
    "UnavailableError",
]
