"""SDK exceptions: one per gRPC status the server uses, each keeping the status code and details."""

from __future__ import annotations

import grpc

POSITION_METADATA_KEY = "rnnstream-position"


class RnnstreamError(Exception):
    """A call failed; `code` and `details` are the gRPC status, `__cause__` the grpc.RpcError."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class InvalidArgumentError(RnnstreamError):
    pass


class NotFoundError(RnnstreamError):
    pass


class AlreadyExistsError(RnnstreamError):
    pass


class FailedPreconditionError(RnnstreamError):
    pass


class PositionMismatchError(RnnstreamError):
    """The session was not at the expected position; `current_position` is where it is."""

    def __init__(self, code: grpc.StatusCode, details: str, current_position: int | None) -> None:
        super().__init__(code, details)
        self.current_position = current_position


class UnavailableError(RnnstreamError):
    pass


class DeadlineExceededError(RnnstreamError):
    pass


class ResourceExhaustedError(RnnstreamError):
    pass


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
}


def from_rpc_error(error: grpc.RpcError) -> RnnstreamError:
    """Build the SDK exception for a failed call (raise it `from error` to keep the cause)."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = (error.details() if hasattr(error, "details") else None) or str(error)
    if code is grpc.StatusCode.ABORTED:
        position = None
        metadata = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
        for key, value in metadata or ():
            if key == POSITION_METADATA_KEY:
                position = int(value)
        return PositionMismatchError(code, details, position)
    return _BY_CODE.get(code, RnnstreamError)(code, details)
