"""Closed-loop load: N sessions, each sending one token and waiting for the reply before the next.

All sessions run as asyncio tasks on one event loop and share a few grpc.aio
channels, so thousands of sessions cost no threads. A run has three phases:
create the sessions, warm up, then measure for a fixed window. Only requests
that complete inside the window count towards throughput and latency. Errors
count over the whole run, session setup included.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from dataclasses import dataclass, field

import grpc
from rnnstream_client._proto.rnnstream.v1 import rnnstream_pb2 as pb
from rnnstream_client._proto.rnnstream.v1 import rnnstream_pb2_grpc as pb_grpc

from . import MODES
from .scrape import ServerStats, scrape_server_stats

logger = logging.getLogger(__name__)

CREATE_CONCURRENCY = 32  # sessions created or deleted at once
ERROR_BACKOFF_S = 0.05  # pause of a session after a failed call, so a down server is not hammered
PROGRESS_INTERVAL_S = 0.5

# Input text; session i starts at byte 97 * i, so concurrent sessions send different tokens.
SAMPLE_TEXT = (
    "A recurrent language model reads one token at a time and carries everything it has seen in a "
    "fixed-size state. Serving it means keeping that state somewhere between requests, loading it when "
    "the next token arrives, and writing it back after the step. When many sessions are active at once, "
    "their steps can share one matrix multiplication, which is where batching pays off. "
)


@dataclass
class LoadOptions:
    target: str
    sessions: int
    duration_s: float
    warmup_s: float
    model: str | None = None  # None: the first model the server lists
    mode: str = "step"
    channels: int = 1
    top_k: int = 5
    timeout_s: float = 10.0
    check_position: bool = True  # send expected_position, as the SDK does
    metrics_url: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"invalid mode {self.mode!r}; expected one of {', '.join(MODES)}")
        if self.sessions < 1:
            raise ValueError(f"invalid session count {self.sessions}; must be at least 1")
        if self.channels < 1:
            raise ValueError(f"invalid channel count {self.channels}; must be at least 1")
        if not self.duration_s > 0:
            raise ValueError(f"invalid duration {self.duration_s} s; must be positive")
        if self.warmup_s < 0:
            raise ValueError(f"invalid warmup {self.warmup_s} s; must not be negative")


@dataclass
class LoadResult:
    model: str
    mode: str
    sessions: int
    window_s: float  # length of the measured window
    latencies_s: list[float]  # one per request completed in the window, one token each
    errors: dict[str, int]  # status code name -> count, over the whole run
    server: ServerStats | None = None  # from the server's metrics, when a metrics URL was given

    @property
    def tokens(self) -> int:
        return len(self.latencies_s)


@dataclass
class _Window:
    start: float  # time.perf_counter() values
    end: float


@dataclass
class _Recorder:
    window: _Window
    latencies_s: list[float] = field(default_factory=list)
    errors: collections.Counter = field(default_factory=collections.Counter)
    completed: int = 0  # requests completed in any phase, for the progress display

    def success(self, sent: float, done: float) -> None:
        self.completed += 1
        if self.window.start <= done <= self.window.end:
            self.latencies_s.append(done - sent)

    def failure(self, code: str) -> None:
        self.errors[code] += 1


def _code_name(error: grpc.aio.AioRpcError) -> str:
    code = error.code()
    return code.name if code is not None else "UNKNOWN"


def _token_source(vocab_size: int, tokenizer: str) -> list[int]:
    """Return the input token ids: the sample text's bytes for a byte tokenizer, else ids spread over the vocabulary."""
    data = SAMPLE_TEXT.encode("utf-8")
    if tokenizer == "byte" and vocab_size >= 256:
        return list(data)
    return [(byte * 31 + index) % vocab_size for index, byte in enumerate(data)]


class LoadGenerator:
    """One closed-loop run against one server; use `await LoadGenerator(options).run()`."""

    def __init__(self, options: LoadOptions) -> None:
        self.options = options
        self._channels: list[grpc.aio.Channel] = []
        self._stubs: list[pb_grpc.RnnStreamStub] = []
        self._tokens: list[int] = []

    async def run(self) -> LoadResult:
        options = self.options
        # A local subchannel pool gives each channel its own connection instead of one shared one.
        channel_options = [("grpc.use_local_subchannel_pool", 1)]
        self._channels = [
            grpc.aio.insecure_channel(options.target, options=channel_options) for _ in range(options.channels)
        ]
        self._stubs = [pb_grpc.RnnStreamStub(channel) for channel in self._channels]
        recorder = _Recorder(_Window(0.0, 0.0))
        session_ids: list[str] = []
        try:
            model = await self._resolve_model()
            session_ids = await self._create_sessions(model.name, recorder)
            if not session_ids:
                raise RuntimeError(f"no session could be created on {options.target}; errors: {dict(recorder.errors)}")
            started = time.perf_counter()
            recorder.window = _Window(started + options.warmup_s, started + options.warmup_s + options.duration_s)
            stats_task = asyncio.create_task(self._scrape(model.name, recorder.window))
            progress_task = asyncio.create_task(self._show_progress(recorder, started))
            loop = self._step_loop if options.mode == "step" else self._stream_loop
            await asyncio.gather(
                *(loop(index, session_id, recorder) for index, session_id in enumerate(session_ids))
            )
            progress_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await progress_task
            server_stats = await stats_task
        finally:
            await self._delete_sessions(session_ids, recorder)
            for channel in self._channels:
                await channel.close()
        return LoadResult(
            model=model.name,
            mode=options.mode,
            sessions=len(session_ids),
            window_s=options.duration_s,
            latencies_s=recorder.latencies_s,
            errors=dict(recorder.errors),
            server=server_stats,
        )

    def _stub(self, index: int) -> pb_grpc.RnnStreamStub:
        return self._stubs[index % len(self._stubs)]

    async def _resolve_model(self) -> pb.ModelInfo:
        options = self.options
        reply = await self._stubs[0].ListModels(pb.ListModelsRequest(), timeout=options.timeout_s)
        models = {model.name: model for model in reply.models}
        if not models:
            raise RuntimeError(f"server {options.target} serves no models")
        if options.model is None:
            model = reply.models[0]
        elif options.model in models:
            model = models[options.model]
        else:
            raise RuntimeError(
                f"model {options.model!r} not found on {options.target}; served models: {', '.join(sorted(models))}"
            )
        self._tokens = _token_source(model.vocab_size, model.tokenizer)
        return model

    async def _create_sessions(self, model: str, recorder: _Recorder) -> list[str]:
        limit = asyncio.Semaphore(CREATE_CONCURRENCY)

        async def create(index: int) -> str | None:
            async with limit:
                request = pb.CreateSessionRequest(model=model, top_k=0)
                try:
                    reply = await self._stub(index).CreateSession(request, timeout=self.options.timeout_s)
                except grpc.aio.AioRpcError as error:
                    recorder.failure(_code_name(error))
                    logger.warning("creating session %d failed: %s", index, error.details())
                    return None
                return reply.session_id

        created = await asyncio.gather(*(create(index) for index in range(self.options.sessions)))
        return [session_id for session_id in created if session_id is not None]

    async def _delete_sessions(self, session_ids: list[str], recorder: _Recorder) -> None:
        limit = asyncio.Semaphore(CREATE_CONCURRENCY)

        async def delete(index: int, session_id: str) -> None:
            async with limit:
                try:
                    request = pb.DeleteSessionRequest(session_id=session_id)
                    await self._stub(index).DeleteSession(request, timeout=self.options.timeout_s)
                except grpc.aio.AioRpcError as error:
                    recorder.failure(_code_name(error))
                    logger.warning("deleting session %s failed: %s", session_id, error.details())

        await asyncio.gather(*(delete(index, session_id) for index, session_id in enumerate(session_ids)))

    def _request(self, session_id: str, cursor: int, position: int | None) -> pb.StepRequest:
        return pb.StepRequest(
            session_id=session_id,
            token_ids=[self._tokens[cursor % len(self._tokens)]],
            top_k=self.options.top_k,
            expected_position=position if self.options.check_position else None,
        )

    async def _step_loop(self, index: int, session_id: str, recorder: _Recorder) -> None:
        stub = self._stub(index)
        cursor = 97 * index
        position: int | None = 0
        end = recorder.window.end
        while True:
            sent = time.perf_counter()
            if sent >= end:
                return
            request = self._request(session_id, cursor, position)
            try:
                reply = await stub.Step(request, timeout=self.options.timeout_s)
            except grpc.aio.AioRpcError as error:
                recorder.failure(_code_name(error))
                # The step may or may not have been applied; the next one goes without a position check.
                position = None
                await asyncio.sleep(ERROR_BACKOFF_S)
                continue
            recorder.success(sent, time.perf_counter())
            position = reply.position
            cursor += 1

    async def _stream_loop(self, index: int, session_id: str, recorder: _Recorder) -> None:
        """Step one session over StreamSession: one message per token, each reply awaited before the next write."""
        stub = self._stub(index)
        cursor = 97 * index
        position: int | None = 0
        end = recorder.window.end
        call = None
        try:
            while True:
                sent = time.perf_counter()
                if sent >= end:
                    return
                if call is None:
                    # The deadline covers the whole stream; a stalled reply fails when it passes.
                    call = stub.StreamSession(timeout=end - sent + self.options.timeout_s)
                try:
                    await call.write(self._request(session_id, cursor, position))
                    reply = await call.read()
                except grpc.aio.AioRpcError as error:
                    recorder.failure(_code_name(error))
                    call, position = None, None
                    await asyncio.sleep(ERROR_BACKOFF_S)
                    continue
                if reply is grpc.aio.EOF:
                    recorder.failure("EOF")  # the server ended the stream without an error status
                    call, position = None, None
                    await asyncio.sleep(ERROR_BACKOFF_S)
                    continue
                recorder.success(sent, time.perf_counter())
                position = reply.position
                cursor += 1
        finally:
            if call is not None:
                await self._close_stream(call, recorder)

    async def _close_stream(self, call, recorder: _Recorder) -> None:
        try:
            await call.done_writing()
            while await call.read() is not grpc.aio.EOF:
                pass
        except grpc.aio.AioRpcError as error:
            recorder.failure(_code_name(error))

    async def _scrape(self, model: str, window: _Window) -> ServerStats | None:
        """Read the server's batch metrics at the start and at the end of the window; None without a metrics URL."""
        url = self.options.metrics_url
        if url is None:
            return None
        await asyncio.sleep(max(0.0, window.start - time.perf_counter()))
        try:
            before = await asyncio.to_thread(scrape_server_stats, url, model)
            await asyncio.sleep(max(0.0, window.end - time.perf_counter()))
            after = await asyncio.to_thread(scrape_server_stats, url, model)
        except OSError as error:
            logger.warning("reading metrics from %s failed, so the server's batch size is unknown: %s", url, error)
            return None
        return after.since(before)

    async def _show_progress(self, recorder: _Recorder, started: float) -> None:
        from tqdm import tqdm

        options = self.options
        total = options.warmup_s + options.duration_s
        bar = tqdm(
            total=round(total, 1),
            unit="s",
            desc=f"{options.sessions} sessions, {options.mode}",
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} s{postfix}",
            disable=None if options.progress else True,  # None: shown only on a terminal
        )
        last_count, last_time = 0, started
        try:
            while True:
                await asyncio.sleep(PROGRESS_INTERVAL_S)
                now = time.perf_counter()
                rate = (recorder.completed - last_count) / (now - last_time)
                last_count, last_time = recorder.completed, now
                phase = "warmup" if now < recorder.window.start else "measuring"
                bar.set_postfix_str(f"{phase}, {rate:,.0f} tok/s, {sum(recorder.errors.values())} errors", refresh=False)
                bar.update(round(min(now - started, total) - bar.n, 1))
        finally:
            bar.close()


def run_load(options: LoadOptions) -> LoadResult:
    """Run one closed-loop load and return its measurements."""
    return asyncio.run(LoadGenerator(options).run())
