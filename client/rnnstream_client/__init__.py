"""Python SDK for rnnstream servers: sessions over LSTM and GRU language models."""

from .client import Client, Session
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
from .types import ModelInfo, SessionInfo, StepResult, TokenPrediction

__all__ = [
    "AlreadyExistsError",
    "Client",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "ModelInfo",
    "NotFoundError",
    "PositionMismatchError",
    "ResourceExhaustedError",
    "RnnstreamError",
    "Session",
    "SessionInfo",
    "StepResult",
    "TokenPrediction",
    "UnavailableError",
]
