"""The one place where domain errors become gRPC status codes."""

from __future__ import annotations

import functools
import logging

import grpc

from ..errors import Category, PositionMismatch, RnnstreamError

logger = logging.getLogger(__name__)

STATUS_CODES = {
    Category.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Category.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Category.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    Category.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    Category.ABORTED: grpc.StatusCode.ABORTED,
    Category.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Category.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Category.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    Category.INTERNAL: grpc.StatusCode.INTERNAL,
}

# Trailing metadata key carrying the session's current position on ABORTED.
POSITION_METADATA_KEY = "rnnstream-position"


def status_of(error: RnnstreamError) -> grpc.StatusCode:
    return STATUS_CODES[error.category]


def trailing_metadata_of(error: RnnstreamError) -> tuple[tuple[str, str], ...]:
    if isinstance(error, PositionMismatch):
        return ((POSITION_METADATA_KEY, str(error.current)),)
    return ()


async def abort_with(error: Exception, method: str, request, context: grpc.aio.ServicerContext) -> None:
    """Abort the call with the status of error; log unexpected errors with the session involved."""
    session_id = getattr(request, "session_id", "") or "-"
    if isinstance(error, RnnstreamError):
        logger.debug("%s on session %s failed: %s", method, session_id, error)
        context.set_trailing_metadata(trailing_metadata_of(error))
        await context.abort(status_of(error), str(error))
    logger.error("%s on session %s failed with an unexpected error", method, session_id, exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}; see the server log")


def unary_errors(method):
    """Turn RnnstreamError into its status, and any other exception into INTERNAL, for a unary RPC."""

    @functools.wraps(method)
    async def wrapper(self, request, context: grpc.aio.ServicerContext):
        try:
            return await method(self, request, context)
        except Exception as error:  # noqa: BLE001 - every error becomes a status
            await abort_with(error, method.__name__, request, context)

    return wrapper


def stream_errors(method):
    """Like unary_errors, for a response-streaming RPC written as an async generator."""

    @functools.wraps(method)
    async def wrapper(self, request, context: grpc.aio.ServicerContext):
        try:
            async for response in method(self, request, context):
                yield response
        except Exception as error:  # noqa: BLE001 - every error becomes a status
            await abort_with(error, method.__name__, request, context)

    return wrapper
