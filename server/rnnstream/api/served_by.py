"""Response metadata that names the process which served a call.

Behind a load balancer or with several workers on one port, the
`rnnstream-served-by` header (HOSTNAME/PID) identifies the replica and worker
that served a call. In a container the hostname is the container's.
"""

from __future__ import annotations

import os
import socket

import grpc

SERVED_BY_KEY = "rnnstream-served-by"


def served_by() -> str:
    return f"{socket.gethostname()}/{os.getpid()}"


class ServedByInterceptor(grpc.aio.ServerInterceptor):
    """Interceptor that sends `rnnstream-served-by` in the initial metadata of every unary-unary call.

    Streaming calls are passed through unchanged, because their handlers may
    write to the context themselves.
    """

    def __init__(self, value: str | None = None) -> None:
        self.metadata = ((SERVED_BY_KEY, value or served_by()),)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        behavior, metadata = handler.unary_unary, self.metadata

        async def unary_unary(request, context: grpc.aio.ServicerContext):
            await context.send_initial_metadata(metadata)
            return await behavior(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
