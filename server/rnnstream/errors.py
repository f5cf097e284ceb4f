"""Errors raised by the engine and stores, each with a category the API maps to a gRPC status."""

from __future__ import annotations

import enum


class Category(enum.Enum):
    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    FAILED_PRECONDITION = "failed_precondition"
    ABORTED = "aborted"
    UNAVAILABLE = "unavailable"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    INTERNAL = "internal"


class RnnstreamError(Exception):
    category = Category.INTERNAL


class InvalidArgument(RnnstreamError):
    category = Category.INVALID_ARGUMENT


class NotFound(RnnstreamError):
    category = Category.NOT_FOUND


class AlreadyExists(RnnstreamError):
    category = Category.ALREADY_EXISTS


class FailedPrecondition(RnnstreamError):
    category = Category.FAILED_PRECONDITION


class WrongModel(FailedPrecondition):
    """A session was routed to a model other than its own."""

    def __init__(self, session_id: str, model: str) -> None:
        super().__init__(f"session {session_id} belongs to model {model}")
        self.session_id = session_id
        self.model = model


class PositionMismatch(RnnstreamError):
    """The session is not at the position the request expected."""

    category = Category.ABORTED

    def __init__(self, session_id: str, expected: int, current: int) -> None:
        super().__init__(
            f"session {session_id} is at position {current}, not the expected position {expected}; "
            f"read the session and retry from position {current}"
        )
        self.session_id = session_id
        self.expected = expected
        self.current = current


class StoreUnavailable(RnnstreamError):
    category = Category.UNAVAILABLE


class Overloaded(RnnstreamError):
    category = Category.RESOURCE_EXHAUSTED
