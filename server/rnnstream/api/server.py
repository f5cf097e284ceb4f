"""Assembly of the gRPC server: models, store, schedulers, servicer, health and reflection."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import dataclass, field

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry
from rnnstream_client._proto.rnnstream.v1 import rnnstream_pb2 as pb
from rnnstream_client._proto.rnnstream.v1 import rnnstream_pb2_grpc as pb_grpc

from ..config import ServerConfig
from ..engine.observer import EngineObserver
from ..engine.runner import ModelRunner, resolve_device
from ..engine.scheduler import Scheduler
from ..engine.sessions import Limits, ServedModel, SessionManager
from ..errors import StoreUnavailable
from ..metrics import MetricsEndpoint, PrometheusObserver, RpcMetricsInterceptor
from ..models.bundle import find_bundles, load_bundle
from ..state.memory import MemoryStore
from ..state.redis_store import RedisStore
from ..state.store import SessionStore
from .served_by import ServedByInterceptor
from .servicer import RnnStreamServicer

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RnnStream"].full_name
HEALTH_INTERVAL_S = 1.0
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


@dataclass
class App:
    server: grpc.aio.Server
    port: int
    manager: SessionManager
    store: SessionStore
    health: health.aio.HealthServicer
    config: ServerConfig
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)  # the server's Prometheus metrics
    metrics: PrometheusObserver | None = None  # None when build_server was given another observer
    metrics_port: int = 0  # bound port of the metrics HTTP endpoint; 0 when it is off
    _metrics_endpoint: MetricsEndpoint | None = None
    _monitor: asyncio.Task | None = None

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls, give in-flight calls `grace` seconds, then release models and store."""
        grace = self.config.grace if grace is None else grace
        await self.health.enter_graceful_shutdown()
        if self._monitor is not None:
            self._monitor.cancel()
        await self.server.stop(grace)
        if self._metrics_endpoint is not None:
            self._metrics_endpoint.close()
        for model in self.manager.models.values():
            model.scheduler.stop()
        self.store.close()


def open_store(config: ServerConfig) -> SessionStore:
    if config.redis_url:
        return RedisStore(config.redis_url, timeout_s=config.redis_timeout)
    return MemoryStore()


def load_models(config: ServerConfig, store: SessionStore, observer: EngineObserver) -> dict[str, ServedModel]:
    device = resolve_device(config.device)
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    models: dict[str, ServedModel] = {}
    for path in find_bundles(config.models_dir):
        bundle = load_bundle(path)
        if bundle.name in models:
            raise ValueError(f"two bundles in {config.models_dir} are named {bundle.name!r}; names must be unique")
        runner = ModelRunner(bundle, device)
        scheduler = Scheduler(
            bundle.name,
            runner,
            store,
            max_batch=config.max_batch,
            max_wait_s=config.max_wait_ms / 1000,
            observer=observer,
            max_chunk_tokens=config.max_chunk_tokens,
        )
        models[bundle.name] = ServedModel(bundle, runner, scheduler)
    if not models:
        raise ValueError(f"no model bundles found in {config.models_dir}")
    return models


def listen_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _check_store(app: App, serving: bool | None) -> bool:
    """Check the store once and set the health status when it changes; return whether it is healthy."""
    try:
        await asyncio.to_thread(app.store.ping)
        healthy = True
    except StoreUnavailable as error:
        healthy = False
        if serving is not False:
            logger.error("session store unavailable, reporting NOT_SERVING: %s", error)
    if healthy and serving is False:
        logger.info("session store reachable again, reporting SERVING")
    if healthy != serving:
        status = health_pb2.HealthCheckResponse.SERVING if healthy else health_pb2.HealthCheckResponse.NOT_SERVING
        await app.health.set("", status)
        await app.health.set(SERVICE_NAME, status)
        if app.metrics is not None:
            app.metrics.store_available(healthy)
    return healthy


async def _watch_store(app: App, serving: bool) -> None:
    """Report NOT_SERVING while the store fails its check, SERVING once it passes again."""
    while True:
        await asyncio.sleep(HEALTH_INTERVAL_S)
        serving = await _check_store(app, serving)


async def build_server(config: ServerConfig, observer: EngineObserver | None = None) -> App:
    """Load models, open the store, and start a gRPC server; return it with its bound port.

    `observer` receives the engine's events; the default is a PrometheusObserver
    on a new registry. Another kind of observer replaces the engine metrics, and
    the RPC metrics remain. With config.metrics_port set, the registry is served
    over HTTP on config.host.
    """
    if observer is None:
        observer = PrometheusObserver(CollectorRegistry())
    metrics = observer if isinstance(observer, PrometheusObserver) else None
    registry = metrics.registry if metrics is not None else CollectorRegistry()
    store = open_store(config)
    models = load_models(config, store, observer)
    if metrics is not None:
        metrics.watch_models(models)
    limits = Limits(
        max_input_tokens=config.max_input_tokens,
        max_generate_tokens=config.max_generate_tokens,
        default_ttl_s=config.default_ttl,
        max_ttl_s=config.max_ttl,
    )
    manager = SessionManager(models, store, limits, observer)

    server = grpc.aio.server(
        interceptors=[RpcMetricsInterceptor(registry), ServedByInterceptor()],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # Several workers share one port; a single process must not share it by accident.
            ("grpc.so_reuseport", 1 if config.workers > 1 else 0),
        ]
    )
    pb_grpc.add_RnnStreamServicer_to_server(RnnStreamServicer(manager), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    address = listen_address(config.host, config.port)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as error:  # grpcio reports a failed bind as RuntimeError
        raise OSError(f"could not listen on {address}: {error}") from error
    if port == 0:
        raise OSError(f"could not listen on {address}")
    endpoint = MetricsEndpoint(registry, config.host, config.metrics_port) if config.metrics_port else None
    await server.start()

    app = App(
        server=server, port=port, manager=manager, store=store, health=health_servicer, config=config,
        registry=registry, metrics=metrics, metrics_port=endpoint.port if endpoint else 0, _metrics_endpoint=endpoint,
    )
    # The first check runs before the server is returned, so health is never unset once callers see it.
    app._monitor = asyncio.create_task(_watch_store(app, await _check_store(app, None)))
    return app


async def serve(config: ServerConfig, worker: int | None = None) -> None:
    """Run the server until SIGTERM or SIGINT, then drain in-flight calls within the grace period.

    `worker` is this process's index when it is one of several workers on the port.
    """
    app = await build_server(config)
    for model in app.manager.models.values():
        logger.info(
            "model %s: %s, %d layers x %d hidden, %d parameters, %d state bytes per session, on %s",
            model.name, model.bundle.config.architecture, model.bundle.config.num_layers,
            model.bundle.config.hidden_size, model.bundle.model.num_parameters(), model.runner.state_nbytes,
            model.runner.device,
        )
    logger.info("session store: %s; torch CPU threads: %d", app.store.description, torch.get_num_threads())
    if isinstance(app.store, MemoryStore):
        logger.warning("no --redis-url set: sessions live in this process only and are lost on restart")
    logger.info(
        "limits: max batch %d, max wait %.1f ms, max input %d tokens, max generate %d tokens, TTL %d s (max %d s)",
        config.max_batch, config.max_wait_ms, config.max_input_tokens, config.max_generate_tokens,
        config.default_ttl, config.max_ttl,
    )
    if worker is None:
        logger.info("serving on %s (port %d)", listen_address(config.host, app.port), app.port)
    else:
        logger.info(
            "serving on %s (port %d) as worker %d of %d, pid %d",
            listen_address(config.host, app.port), app.port, worker, config.workers, os.getpid(),
        )
    if app.metrics_port:
        logger.info("Prometheus metrics on http://%s/metrics", listen_address(config.host, app.metrics_port))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    logger.info(
        "stopping: draining in-flight calls on %s for up to %.1f s", listen_address(config.host, app.port), config.grace
    )
    await app.stop()
    logger.info("stopped serving on %s", listen_address(config.host, app.port))
