"""Prometheus metrics: engine events per model, architecture and device, and per-RPC counts.

PrometheusObserver turns the engine's observer hooks into histograms, counters
and gauges. RpcMetricsInterceptor counts every RPC by method and status code.
Both register in the CollectorRegistry they are given, so a test or a second
server in one process gets its own set. docs/observability.md lists every
metric.

Label values are bounded: model names and devices come from the loaded
bundles, RPC names from the registered services, and status codes from
grpc.StatusCode. Nothing is labelled by session.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections import Counter as Tally
from dataclasses import dataclass

import grpc
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .config import METRICS_PORT_AUTO
from .engine.observer import BatchStats, EngineObserver
from .engine.sessions import ServedModel

# Seconds, from 100 µs (a small model's step, a Redis round trip on loopback)
# to 60 s (a long prompt on a cold device).
# fmt: off
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0,
)
# fmt: on
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)

MODEL_LABELS = ("model", "architecture", "device")
SESSION_LABELS = ("model", "architecture")
UNKNOWN_RPC = "unknown"  # the rpc label of calls to a method no service registers


def worker_metrics_port(base_port: int, worker_index: int) -> int:
    """Return the metrics port of worker `worker_index` (0-based): base + index, one endpoint per worker.

    0 (metrics off) and METRICS_PORT_AUTO (each worker picks a free port) pass through unchanged.
    """
    return base_port + worker_index if base_port > 0 else base_port


class MetricsEndpoint:
    """An HTTP server on a daemon thread that serves a registry in the Prometheus text format."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        """Start serving on host:port, or a free port for METRICS_PORT_AUTO. Raise OSError if it is taken."""
        try:
            self._httpd, self._thread = start_http_server(
                0 if port == METRICS_PORT_AUTO else port, addr=host, registry=registry
            )
        except OSError as error:
            raise OSError(
                f"cannot serve metrics on {host} port {port}: {error}. Choose a free --metrics-port"
            ) from error
        self.port: int = self._httpd.server_port

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


@dataclass
class _ModelSeries:
    """The label children of one (model, architecture, device), bound once so hooks skip the label lookup."""

    step_seconds: Histogram
    queue_wait_seconds: Histogram
    state_load_seconds: Histogram
    state_save_seconds: Histogram
    batch_size: Histogram
    request_tokens: Histogram
    time_to_first_token_seconds: Histogram
    inter_token_latency_seconds: Histogram
    tokens: Counter
    state_read_bytes: Counter
    state_written_bytes: Counter


@dataclass
class _SessionSeries:
    created: Counter
    deleted: Counter
    expired: Counter


class _DeviceMemoryCollector(Collector):
    """CUDA memory of the devices models run on, read at scrape time; yields nothing on a CPU-only server."""

    def __init__(self) -> None:
        self.devices: list[torch.device] = []

    def collect(self):
        if not self.devices:
            return
        allocated = GaugeMetricFamily(
            "rnnstream_device_memory_allocated_bytes",
            "Device memory held by tensors (torch.cuda.memory_allocated).",
            labels=["device"],
        )
        reserved = GaugeMetricFamily(
            "rnnstream_device_memory_reserved_bytes",
            "Device memory reserved by torch's caching allocator (torch.cuda.memory_reserved).",
            labels=["device"],
        )
        for device in self.devices:
            allocated.add_metric([str(device)], torch.cuda.memory_allocated(device))
            reserved.add_metric([str(device)], torch.cuda.memory_reserved(device))
        yield allocated
        yield reserved


class PrometheusObserver(EngineObserver):
    """Record engine events as Prometheus metrics in `registry`.

    Example::

        registry = CollectorRegistry()
        observer = PrometheusObserver(registry)
        app = await build_server(config, observer)
        print(generate_latest(registry).decode())
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

        def histogram(name: str, documentation: str, buckets=LATENCY_BUCKETS) -> Histogram:
            return Histogram(name, documentation, MODEL_LABELS, registry=registry, buckets=buckets)

        def counter(name: str, documentation: str, labels=MODEL_LABELS) -> Counter:
            return Counter(name, documentation, labels, registry=registry)

        self.step_seconds = histogram(
            "rnnstream_model_step_seconds",
            "Batched model forward pass, including the device synchronisation.",
        )
        self.queue_wait_seconds = histogram(
            "rnnstream_queue_wait_seconds",
            "Time a step waited in its model's queue before its batch started.",
        )
        self.state_load_seconds = histogram(
            "rnnstream_state_load_seconds", "Session store round trip that loads the states of one batch."
        )
        self.state_save_seconds = histogram(
            "rnnstream_state_save_seconds", "Session store round trip that saves the states of one batch."
        )
        self.batch_size = histogram(
            "rnnstream_batch_size", "Sessions per batched model step.", BATCH_SIZE_BUCKETS
        )
        self.request_tokens = histogram(
            "rnnstream_request_tokens", "Input tokens per step request.", TOKEN_BUCKETS
        )
        self.time_to_first_token_seconds = histogram(
            "rnnstream_time_to_first_token_seconds",
            "Generate: time from the request to its first streamed token.",
        )
        self.inter_token_latency_seconds = histogram(
            "rnnstream_inter_token_latency_seconds", "Generate: time between consecutive streamed tokens."
        )
        self.tokens = counter("rnnstream_tokens_total", "Tokens fed through model steps.")
        self.state_read_bytes = counter(
            "rnnstream_state_read_bytes_total", "Packed state bytes loaded from the store."
        )
        self.state_written_bytes = counter(
            "rnnstream_state_written_bytes_total", "Packed state bytes written to the store."
        )
        self.sessions_created = counter(
            "rnnstream_sessions_created_total", "Sessions created by this server.", SESSION_LABELS
        )
        self.sessions_deleted = counter(
            "rnnstream_sessions_deleted_total", "Sessions deleted through this server.", SESSION_LABELS
        )
        self.sessions_expired = counter(
            "rnnstream_sessions_expired_total",
            "Sessions this server had served that a later call found gone, not deleted through this server.",
            SESSION_LABELS,
        )
        self.queued_steps = Gauge(
            "rnnstream_queued_steps",
            "Steps waiting in the model's scheduler queue.",
            MODEL_LABELS,
            registry=registry,
        )
        self.models_loaded = Gauge(
            "rnnstream_models_loaded", "Models served.", ("architecture", "device"), registry=registry
        )
        self.store_availability = Gauge(
            "rnnstream_store_available",
            "1 while the session store answers the health ping, 0 while the server reports NOT_SERVING.",
            registry=registry,
        )
        self._device_memory = _DeviceMemoryCollector()
        registry.register(self._device_memory)

        self._models: dict[tuple[str, str, str], _ModelSeries] = {}
        self._sessions: dict[tuple[str, str], _SessionSeries] = {}

    def _model_series(self, model: str, architecture: str, device: str) -> _ModelSeries:
        key = (model, architecture, device)
        series = self._models.get(key)
        if series is None:
            # Two threads may bind the same key at once; labels() returns the same children to both.
            series = _ModelSeries(
                step_seconds=self.step_seconds.labels(*key),
                queue_wait_seconds=self.queue_wait_seconds.labels(*key),
                state_load_seconds=self.state_load_seconds.labels(*key),
                state_save_seconds=self.state_save_seconds.labels(*key),
                batch_size=self.batch_size.labels(*key),
                request_tokens=self.request_tokens.labels(*key),
                time_to_first_token_seconds=self.time_to_first_token_seconds.labels(*key),
                inter_token_latency_seconds=self.inter_token_latency_seconds.labels(*key),
                tokens=self.tokens.labels(*key),
                state_read_bytes=self.state_read_bytes.labels(*key),
                state_written_bytes=self.state_written_bytes.labels(*key),
            )
            self._models[key] = series
        return series

    def _session_series(self, model: str, architecture: str) -> _SessionSeries:
        key = (model, architecture)
        series = self._sessions.get(key)
        if series is None:
            series = _SessionSeries(
                created=self.sessions_created.labels(*key),
                deleted=self.sessions_deleted.labels(*key),
                expired=self.sessions_expired.labels(*key),
            )
            self._sessions[key] = series
        return series

    def watch_models(self, models: dict[str, ServedModel]) -> None:
        """Bind the series of the served models, count them, and read queues and CUDA memory when scraped."""
        loaded: Tally[tuple[str, str]] = Tally()
        for model in models.values():
            device = str(model.runner.device)
            self._model_series(model.name, model.architecture, device)
            self._session_series(model.name, model.architecture)
            queued = self.queued_steps.labels(model.name, model.architecture, device)
            queued.set_function(lambda scheduler=model.scheduler: scheduler.queued)
            loaded[(model.architecture, device)] += 1
            if model.runner.device.type == "cuda" and model.runner.device not in self._device_memory.devices:
                self._device_memory.devices.append(model.runner.device)
        for (architecture, device), count in loaded.items():
            self.models_loaded.labels(architecture, device).set(count)

    def store_available(self, available: bool) -> None:
        self.store_availability.set(1 if available else 0)

    # -- engine hooks --------------------------------------------------------

    def batch_done(self, stats: BatchStats) -> None:
        series = self._model_series(stats.model, stats.architecture, stats.device)
        series.step_seconds.observe(stats.compute_s)
        series.state_load_seconds.observe(stats.load_s)
        series.state_save_seconds.observe(stats.store_s)
        series.batch_size.observe(stats.size)
        series.tokens.inc(stats.tokens)
        series.state_read_bytes.inc(stats.bytes_read)
        series.state_written_bytes.inc(stats.bytes_written)
        for wait_s in stats.queue_wait_s:
            series.queue_wait_seconds.observe(wait_s)
        for count in stats.request_tokens:
            series.request_tokens.observe(count)

    def queue_depth(self, model: str, architecture: str, device: str, depth: int) -> None:
        # A no-op for models passed to watch_models, whose gauge reads the live queue length instead.
        self.queued_steps.labels(model, architecture, device).set(depth)

    def session_created(self, model: str, architecture: str) -> None:
        self._session_series(model, architecture).created.inc()

    def session_deleted(self, model: str, architecture: str) -> None:
        self._session_series(model, architecture).deleted.inc()

    def session_expired(self, model: str, architecture: str) -> None:
        self._session_series(model, architecture).expired.inc()

    def generated_token(
        self, model: str, architecture: str, device: str, seconds: float, first: bool
    ) -> None:
        series = self._model_series(model, architecture, device)
        if first:
            series.time_to_first_token_seconds.observe(seconds)
        else:
            series.inter_token_latency_seconds.observe(seconds)


class _RpcSeries:
    """The label children of one RPC method."""

    def __init__(self, interceptor: RpcMetricsInterceptor, rpc: str) -> None:
        self._requests = interceptor.requests
        self.rpc = rpc
        self.duration = interceptor.duration.labels(rpc)
        self.in_flight = interceptor.in_flight.labels(rpc)
        self._codes = {grpc.StatusCode.OK: interceptor.requests.labels(rpc, grpc.StatusCode.OK.name)}

    def finish(self, code: grpc.StatusCode, seconds: float) -> None:
        counter = self._codes.get(code)
        if counter is None:
            counter = self._codes[code] = self._requests.labels(self.rpc, code.name)
        counter.inc()
        self.duration.observe(seconds)


def _status_of(context: grpc.aio.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    """Return the status code an RPC ended with, given the exception its handler raised, if any."""
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED
    # Set by context.set_code and context.abort. grpc.aio sends it even when the handler raises.
    code = context.code()
    if code is not None:
        return code
    return grpc.StatusCode.OK if error is None else grpc.StatusCode.UNKNOWN


def _measure_response(behavior, series: _RpcSeries):
    """Wrap a unary-response handler (a coroutine function) to record its outcome and duration."""
    if not inspect.iscoroutinefunction(behavior):
        return behavior  # NOTE: synchronous handlers go unmeasured; every rnnstream service is asyncio

    async def measured(request, context):
        series.in_flight.inc()
        started = time.perf_counter()
        error = None
        try:
            return await behavior(request, context)
        except BaseException as caught:
            error = caught
            raise
        finally:
            series.in_flight.dec()
            series.finish(_status_of(context, error), time.perf_counter() - started)

    return measured


def _measure_stream(behavior, series: _RpcSeries):
    """Wrap a response-streaming handler, an async generator or a coroutine using context.write, likewise."""
    if inspect.iscoroutinefunction(behavior):
        return _measure_response(behavior, series)
    if not inspect.isasyncgenfunction(behavior):
        return behavior

    async def measured(request, context):
        series.in_flight.inc()
        started = time.perf_counter()
        error = None
        try:
            async with contextlib.aclosing(behavior(request, context)) as responses:
                async for response in responses:
                    yield response
        except BaseException as caught:
            error = caught
            raise
        finally:
            series.in_flight.dec()
            series.finish(_status_of(context, error), time.perf_counter() - started)

    return measured


class RpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Count RPCs by method and status code, and time them, for every service of a grpc.aio server.

    The status code is the one the client receives: the code given to
    context.abort or context.set_code, else OK on return and UNKNOWN on an
    exception, and CANCELLED or DEADLINE_EXCEEDED when the call was cancelled.
    A streaming RPC counts once, when its stream ends.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "rnnstream_requests_total",
            "RPCs finished, by method and status code.",
            ("rpc", "code"),
            registry=registry,
        )
        self.duration = Histogram(
            "rnnstream_rpc_duration_seconds",
            "Time from the start of an RPC to its end, the whole stream for a streaming RPC.",
            ("rpc",),
            registry=registry,
            buckets=LATENCY_BUCKETS,
        )
        self.in_flight = Gauge(
            "rnnstream_requests_in_flight", "RPCs in progress.", ("rpc",), registry=registry
        )
        # Keyed by method path. Only registered methods get an entry, so both stay bounded.
        self._series: dict[str, _RpcSeries] = {}
        self._handlers: dict[
            str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]
        ] = {}  # (handler, measured)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None:
            # grpc returns UNIMPLEMENTED. The path is the client's choice, so it is not a label value.
            self.requests.labels(UNKNOWN_RPC, grpc.StatusCode.UNIMPLEMENTED.name).inc()
            return None
        cached = self._handlers.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        # An interceptor later in the chain may return a new handler per call, so series outlive handlers.
        series = self._series.get(method)
        if series is None:
            series = self._series[method] = _RpcSeries(self, method.rsplit("/", 1)[-1])
        measured = self._measure(handler, series)
        self._handlers[method] = (handler, measured)
        return measured

    @staticmethod
    def _measure(handler: grpc.RpcMethodHandler, series: _RpcSeries) -> grpc.RpcMethodHandler:
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=_measure_response(handler.unary_unary, series))
        if handler.stream_unary is not None:
            return handler._replace(stream_unary=_measure_response(handler.stream_unary, series))
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=_measure_stream(handler.unary_stream, series))
        return handler._replace(stream_stream=_measure_stream(handler.stream_stream, series))
