"""The asyncio client, with the names of the synchronous one: Client, Session, SessionStream."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc

from ._proto.rnnstream.v1 import rnnstream_pb2 as pb
from ._proto.rnnstream.v1 import rnnstream_pb2_grpc as pb_grpc
from .client import (
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT_S,
    RETRY_BACKOFF_S,
    Input,
    create_session_request,
    generate_request,
    open_channel,
    step_request,
    stream_closed_error,
)
from .errors import RnnstreamError, UnavailableError, from_rpc_error
from .types import GenerateChunk, ModelInfo, SessionInfo, StepResult


class Client:
    """An asyncio connection to an rnnstream server; every call has a deadline of `timeout` seconds by default."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, object]] = (),
    ) -> None:
        self.target = target
        self.timeout = timeout
        self._channel = open_channel(grpc.aio, target, credentials, options)
        self._stub = pb_grpc.RnnStreamStub(self._channel)

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    aclose = close

    async def _call(self, method: str, request, timeout: float | None):
        try:
            return await getattr(self._stub, method)(request, timeout=self.timeout if timeout is None else timeout)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error

    async def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        reply = await self._call("ListModels", pb.ListModelsRequest(), timeout)
        return [ModelInfo.from_proto(model) for model in reply.models]

    async def create_session(
        self,
        model: str,
        *,
        session_id: str | None = None,
        ttl_seconds: int = 0,
        prompt: Input | None = None,
        top_k: int | None = None,
        timeout: float | None = None,
    ) -> "Session":
        request = create_session_request(model, session_id, ttl_seconds, prompt, top_k)
        reply = await self._call("CreateSession", request, timeout)
        session = Session(self, reply.session_id, model=model, position=reply.position)
        session.last = StepResult.from_proto(reply)
        return session

    async def import_state(
        self, blob: bytes, *, session_id: str | None = None, ttl_seconds: int = 0, timeout: float | None = None
    ) -> "Session":
        request = pb.ImportStateRequest(blob=blob, session_id=session_id or "", ttl_seconds=ttl_seconds)
        info = SessionInfo.from_proto(await self._call("ImportState", request, timeout))
        return Session(self, info.session_id, model=info.model, position=info.position)

    def session(self, session_id: str, *, position: int | None = None) -> "Session":
        return Session(self, session_id, position=position)


class Session:
    """One session; steps carry the expected position, so a retried step is never applied twice."""

    def __init__(self, client: Client, session_id: str, *, model: str | None = None, position: int | None = None):
        self.client = client
        self.id = session_id
        self.model = model
        self.position = position
        self.last: StepResult | None = None

    def __repr__(self) -> str:
        return f"Session(id={self.id!r}, model={self.model!r}, position={self.position})"

    async def step(
        self, input: Input, *, top_k: int | None = None, retries: int = 2, timeout: float | None = None
    ) -> StepResult:
        request = step_request(self.id, self.position, input, top_k)
        attempts = 1 + (retries if self.position is not None else 0)
        for attempt in range(attempts):
            try:
                reply = await self.client._call("Step", request, timeout)
                break
            except UnavailableError:
                if attempt + 1 == attempts:
                    raise
                await asyncio.sleep(RETRY_BACKOFF_S[min(attempt, len(RETRY_BACKOFF_S) - 1)])
        result = StepResult.from_proto(reply)
        self.position = result.position
        self.last = result
        return result

    async def info(self, *, timeout: float | None = None) -> SessionInfo:
        reply = await self.client._call("GetSession", pb.GetSessionRequest(session_id=self.id), timeout)
        info = SessionInfo.from_proto(reply)
        self.model = info.model
        return info

    async def delete(self, *, timeout: float | None = None) -> None:
        await self.client._call("DeleteSession", pb.DeleteSessionRequest(session_id=self.id), timeout)

    def generate(
        self,
        prompt: Input | None = None,
        *,
        max_tokens: int = 64,
        temperature: float | None = None,
        top_k: int = 0,
        top_p: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
        timeout: float | None = None,
    ) -> "GenerateStream":
        """Sample up to max_tokens tokens; iterate the result with `async for` as they stream.

        Leaving the loop early (break) cancels the call at once and makes the
        Session forget its position, as in the synchronous Session.generate().
        """
        request = generate_request(self.id, self.position, prompt, max_tokens, temperature, top_k, top_p, seed, stop)
        call = self.client._stub.Generate(request, timeout=self.client.timeout if timeout is None else timeout)
        return GenerateStream(self, call)

    def stream(self, *, timeout: float | None = None) -> "SessionStream":
        """Open a StreamSession call (no deadline unless `timeout` is given); use with `async with`."""
        return SessionStream(self, timeout)

    async def fork(
        self, *, session_id: str | None = None, ttl_seconds: int = 0, timeout: float | None = None
    ) -> "Session":
        request = pb.ForkSessionRequest(session_id=self.id, new_session_id=session_id or "", ttl_seconds=ttl_seconds)
        info = SessionInfo.from_proto(await self.client._call("ForkSession", request, timeout))
        return Session(self.client, info.session_id, model=info.model, position=info.position)

    async def reset(self, *, timeout: float | None = None) -> SessionInfo:
        reply = await self.client._call("ResetSession", pb.ResetSessionRequest(session_id=self.id), timeout)
        info = SessionInfo.from_proto(reply)
        self.position = info.position
        return info

    async def export_state(self, *, timeout: float | None = None) -> bytes:
        reply = await self.client._call("ExportState", pb.ExportStateRequest(session_id=self.id), timeout)
        return reply.blob


class GenerateStream:
    """The chunks of one Generate call, as an async iterator.

    A class rather than an async generator: CPython finalizes it as soon as a
    loop that breaks drops it, so the call is cancelled right away instead of
    whenever the event loop gets to closing an abandoned async generator.
    """

    def __init__(self, session: Session, call) -> None:
        self.session = session
        self._call = call
        self._finished = False
        self._closed = False

    def __aiter__(self) -> "GenerateStream":
        return self

    async def __anext__(self) -> GenerateChunk:
        if self._closed:
            raise StopAsyncIteration
        try:
            message = await self._call.read()
        except grpc.RpcError as error:
            self._close()
            raise from_rpc_error(error) from error
        if message is grpc.aio.EOF:
            self._close()
            raise StopAsyncIteration
        chunk = GenerateChunk.from_proto(message)
        self.session.position = chunk.position
        self._finished = self._finished or bool(chunk.finish_reason)
        return chunk

    async def aclose(self) -> None:
        self._close()

    async def __aenter__(self) -> "GenerateStream":
        return self

    async def __aexit__(self, *exc_info) -> None:
        self._close()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._call.cancel()
        if not self._finished:
            self.session.position = None  # tokens in flight at the cancel may have been kept

    def __del__(self) -> None:
        self._close()


class SessionStream:
    """A bidirectional StreamSession call on one session."""

    def __init__(self, session: Session, timeout: float | None) -> None:
        self.session = session
        self._error: RnnstreamError | None = None  # the error that ended the call
        self._call = session.client._stub.StreamSession(timeout=timeout)

    async def __aenter__(self) -> "SessionStream":
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def step(self, input: Input, *, top_k: int | None = None) -> StepResult:
        if self._error is not None:
            raise stream_closed_error(self._error)
        request = step_request(self.session.id, self.session.position, input, top_k)
        try:
            await self._call.write(request)
            reply = await self._call.read()
        except grpc.RpcError as error:
            self._error = from_rpc_error(error)
            raise self._error from error
        if reply is grpc.aio.EOF:
            raise RnnstreamError(grpc.StatusCode.UNKNOWN, "the server closed the stream without replying to a step")
        result = StepResult.from_proto(reply)
        self.session.position = result.position
        self.session.last = result
        return result

    async def close(self) -> None:
        try:
            await self._call.done_writing()
        except grpc.RpcError:
            pass
        self._call.cancel()


__all__ = ["Client", "Session", "SessionStream"]
