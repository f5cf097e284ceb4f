"""The synchronous client: Client (a channel to one server) and Session (one stateful session)."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator, Sequence

import grpc

from ._proto.rnnstream.v1 import rnnstream_pb2 as pb
from ._proto.rnnstream.v1 import rnnstream_pb2_grpc as pb_grpc
from .errors import RnnstreamError, UnavailableError, from_rpc_error
from .types import GenerateChunk, ModelInfo, SessionInfo, StepResult

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT_S = 30.0
RETRY_BACKOFF_S = (0.05, 0.2, 0.5)

Input = str | Sequence[int]


def generate_request(
    session_id: str,
    position: int | None,
    prompt: "Input | None",
    max_tokens: int,
    temperature: float | None,
    top_k: int,
    top_p: float | None,
    seed: int | None,
    stop: Sequence[str],
) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        session_id=session_id,
        max_tokens=max_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        stop=list(stop),
        expected_position=position,
        **input_fields(prompt, "prompt_token_ids", "prompt"),
    )


def open_channel(module, target: str, credentials: grpc.ChannelCredentials | None, options: Sequence):
    """Open a channel with `module` (grpc or grpc.aio): TLS when credentials are given, else plaintext."""
    if credentials is None:
        return module.insecure_channel(target, options=list(options))
    return module.secure_channel(target, credentials, options=list(options))


def create_session_request(
    model: str, session_id: str | None, ttl_seconds: int, prompt: "Input | None", top_k: int | None
) -> pb.CreateSessionRequest:
    return pb.CreateSessionRequest(
        model=model,
        session_id=session_id or "",
        ttl_seconds=ttl_seconds,
        top_k=top_k,
        **input_fields(prompt, "prompt_token_ids", "prompt"),
    )


def step_request(session_id: str, position: int | None, input: "Input", top_k: int | None) -> pb.StepRequest:
    return pb.StepRequest(
        session_id=session_id,
        top_k=top_k,
        expected_position=position,
        **input_fields(input, "token_ids", "text"),
    )


def input_fields(value: Input | None, ids_field: str, text_field: str) -> dict:
    """Map text to the text field and a sequence of ints to the token-id field."""
    if value is None:
        return {}
    if isinstance(value, str):
        return {text_field: value}
    if isinstance(value, (bytes, bytearray)):
        raise TypeError("pass text as str or tokens as a sequence of ints, not bytes")
    return {ids_field: list(value)}


class Client:
    """A connection to an rnnstream server.

    Every call has a deadline: `timeout` seconds unless the call passes its own.
    Use it as a context manager or call close().
    """

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
        self._channel = open_channel(grpc, target, credentials, options)
        self._stub = pb_grpc.RnnStreamStub(self._channel)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: str, request, timeout: float | None):
        try:
            return getattr(self._stub, method)(request, timeout=self.timeout if timeout is None else timeout)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        reply = self._call("ListModels", pb.ListModelsRequest(), timeout)
        return [ModelInfo.from_proto(model) for model in reply.models]

    def create_session(
        self,
        model: str,
        *,
        session_id: str | None = None,
        ttl_seconds: int = 0,
        prompt: Input | None = None,
        top_k: int | None = None,
        timeout: float | None = None,
    ) -> "Session":
        """Open a session on model; its first result (predictions after the prompt) is `session.last`."""
        request = create_session_request(model, session_id, ttl_seconds, prompt, top_k)
        reply = self._call("CreateSession", request, timeout)
        session = Session(self, reply.session_id, model=model, position=reply.position)
        session.last = StepResult.from_proto(reply)
        return session

    def import_state(
        self, blob: bytes, *, session_id: str | None = None, ttl_seconds: int = 0, timeout: float | None = None
    ) -> "Session":
        """Create a session from a blob made by Session.export_state()."""
        request = pb.ImportStateRequest(blob=blob, session_id=session_id or "", ttl_seconds=ttl_seconds)
        info = SessionInfo.from_proto(self._call("ImportState", request, timeout))
        return Session(self, info.session_id, model=info.model, position=info.position)

    def session(self, session_id: str, *, position: int | None = None) -> "Session":
        """Attach to an existing session; with no position, the first step does not check it."""
        return Session(self, session_id, position=position)


class Session:
    """One session. Steps carry the expected position, so a retried step is never applied twice.

    A Session object tracks one position: step it from one thread at a time.
    """

    def __init__(self, client: Client, session_id: str, *, model: str | None = None, position: int | None = None):
        self.client = client
        self.id = session_id
        self.model = model
        self.position = position
        self.last: StepResult | None = None

    def __repr__(self) -> str:
        return f"Session(id={self.id!r}, model={self.model!r}, position={self.position})"

    def step(self, input: Input, *, top_k: int | None = None, retries: int = 2, timeout: float | None = None) -> StepResult:
        """Feed text or token ids; return the predictions after them.

        UNAVAILABLE is retried up to `retries` times when the position is known:
        the server applies a retried step at most once.
        """
        request = step_request(self.id, self.position, input, top_k)
        attempts = 1 + (retries if self.position is not None else 0)
        for attempt in range(attempts):
            try:
                reply = self.client._call("Step", request, timeout)
                break
            except UnavailableError:
                if attempt + 1 == attempts:
                    raise
                time.sleep(RETRY_BACKOFF_S[min(attempt, len(RETRY_BACKOFF_S) - 1)])
        result = StepResult.from_proto(reply)
        self.position = result.position
        self.last = result
        return result

    def info(self, *, timeout: float | None = None) -> SessionInfo:
        info = SessionInfo.from_proto(self.client._call("GetSession", pb.GetSessionRequest(session_id=self.id), timeout))
        self.model = info.model
        return info

    def delete(self, *, timeout: float | None = None) -> None:
        self.client._call("DeleteSession", pb.DeleteSessionRequest(session_id=self.id), timeout)

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
    ) -> Iterator[GenerateChunk]:
        """Sample up to max_tokens tokens, yielding them as the server streams them.

        Closing the iterator early cancels the call. The session keeps the
        tokens the server sent before the cancel reached it, which can include
        tokens in flight that were never read, so the Session clears its
        position: the next step does not check it, and info() reads it.
        """
        request = generate_request(self.id, self.position, prompt, max_tokens, temperature, top_k, top_p, seed, stop)
        call = self.client._stub.Generate(request, timeout=self.client.timeout if timeout is None else timeout)
        finished = False
        try:
            for message in call:
                chunk = GenerateChunk.from_proto(message)
                self.position = chunk.position
                finished = bool(chunk.finish_reason)
                yield chunk
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error
        finally:
            call.cancel()
            if not finished:
                self.position = None

    def stream(self, *, timeout: float | None = None) -> "SessionStream":
        """Open a StreamSession call: each step() sends one input and waits for its reply, in order.

        The stream has no deadline unless `timeout` is given.
        """
        return SessionStream(self, timeout)

    def fork(self, *, session_id: str | None = None, ttl_seconds: int = 0, timeout: float | None = None) -> "Session":
        """Copy this session's state and position to a new session."""
        request = pb.ForkSessionRequest(session_id=self.id, new_session_id=session_id or "", ttl_seconds=ttl_seconds)
        info = SessionInfo.from_proto(self.client._call("ForkSession", request, timeout))
        return Session(self.client, info.session_id, model=info.model, position=info.position)

    def reset(self, *, timeout: float | None = None) -> SessionInfo:
        """Return the session to its initial state, position 0."""
        info = SessionInfo.from_proto(self.client._call("ResetSession", pb.ResetSessionRequest(session_id=self.id), timeout))
        self.position = info.position
        return info

    def export_state(self, *, timeout: float | None = None) -> bytes:
        """Return an opaque, versioned, checksummed blob of the session for Client.import_state()."""
        reply = self.client._call("ExportState", pb.ExportStateRequest(session_id=self.id), timeout)
        return reply.blob


_END_OF_STREAM = object()


def stream_closed_error(cause: RnnstreamError) -> RnnstreamError:
    return RnnstreamError(
        cause.code, f"this stream already ended with {cause.code.name}: {cause.details}; open a new one with session.stream()"
    )


class SessionStream:
    """A bidirectional StreamSession call on one session; use as a context manager."""

    def __init__(self, session: Session, timeout: float | None) -> None:
        self.session = session
        self._error: RnnstreamError | None = None  # the error that ended the call
        self._requests: queue.Queue = queue.Queue()
        self._call = session.client._stub.StreamSession(iter(self._requests.get, _END_OF_STREAM), timeout=timeout)

    def __enter__(self) -> "SessionStream":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def step(self, input: Input, *, top_k: int | None = None) -> StepResult:
        if self._error is not None:
            raise stream_closed_error(self._error)
        self._requests.put(step_request(self.session.id, self.session.position, input, top_k))
        try:
            reply = next(self._call)
        except grpc.RpcError as error:
            self._error = from_rpc_error(error)
            raise self._error from error
        result = StepResult.from_proto(reply)
        self.session.position = result.position
        self.session.last = result
        return result

    def close(self) -> None:
        self._requests.put(_END_OF_STREAM)
        self._call.cancel()


__all__ = ["Client", "Session", "SessionStream", "RnnstreamError"]
