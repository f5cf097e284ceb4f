"""Several server processes on one port: a supervisor and its workers.

Every worker is a whole server (its own models, store client and grpc.aio
server) whose listening socket sets SO_REUSEPORT, so the Linux kernel spreads
new connections across the workers. A connection stays with one worker, but
sessions live in the shared store, so any worker can step any session. The
in-process store cannot be shared, so workers need --redis-url.

The supervisor keeps the port bound while workers run, forwards SIGTERM and
SIGINT to them, and exits once they have all exited. When a worker exits on its own, the
supervisor stops the others and exits with status 1, leaving restarts to the
process manager (systemd, Docker, Kubernetes).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import time

from ..config import ServerConfig
from ..metrics import worker_metrics_port

logger = logging.getLogger(__name__)

# Seconds a worker may take beyond its drain grace period before the supervisor kills it.
EXIT_MARGIN_S = 10.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def worker_config(config: ServerConfig, index: int, cuda_devices: int) -> ServerConfig:
    """Return the settings of worker `index`: its own metrics port, and its own GPU when there are several.

    Worker i serves metrics on metrics_port + i, while 0 (off) and
    --metrics-port auto (a free port each) apply to every worker. With "cuda"
    or "auto" and several CUDA devices, worker i runs on cuda:(i mod device
    count); an explicit cuda:N or cpu applies to every worker.
    """
    device = config.device
    if cuda_devices > 1 and device in ("cuda", "auto"):
        device = f"cuda:{index % cuda_devices}"
    metrics_port = worker_metrics_port(config.metrics_port, index)
    return dataclasses.replace(config, device=device, metrics_port=metrics_port)


def check_workers_config(config: ServerConfig) -> None:
    """Raise ValueError for settings that cannot work with several workers."""
    if not config.redis_url:
        raise ValueError(
            f"--workers {config.workers} requires --redis-url: "
            "workers cannot share the in-process session store"
        )
    if config.metrics_port > 0 and config.metrics_port + config.workers - 1 > 65535:
        raise ValueError(
            f"metrics ports {config.metrics_port} to {config.metrics_port + config.workers - 1} "
            "exceed 65535; lower --metrics-port"
        )


@contextlib.contextmanager
def reserve_port(host: str, port: int):
    """Bind (without listening) a SO_REUSEPORT socket on host:port and yield its port.

    Holding it keeps the port, including one picked for port 0, for the workers.
    A socket that does not listen receives no connections.
    """
    family, kind, protocol, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, protocol)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        yield sock.getsockname()[1]
    finally:
        sock.close()


def _count_cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def run_worker(config: ServerConfig, index: int) -> None:
    """Entry point of a worker process (started with the spawn method)."""
    from ..logs import configure_logging
    from .server import serve

    configure_logging(config.log_level, config.log_format)
    cuda_devices = _count_cuda_devices() if config.device in ("cuda", "auto") else 0
    try:
        asyncio.run(serve(worker_config(config, index, cuda_devices), worker=index))
    except (ValueError, OSError) as error:
        logger.error("worker %d cannot start: %s", index, error)
        sys.exit(1)


class Supervisor:
    """Parent of the workers: starts them, forwards stop signals, and waits for every worker to exit."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.processes: list[multiprocessing.Process] = []
        self.stopping = False
        self.failed = False
        self.kill_deadline: float | None = None

    def stop(self, reason: str) -> None:
        """Send SIGTERM to every running worker; they drain in-flight calls for the grace period."""
        if not self.stopping:
            logger.info("stopping %d workers: %s", len(self.processes), reason)
            self.stopping = True
            self.kill_deadline = time.monotonic() + self.config.grace + EXIT_MARGIN_S
        for process in self.processes:
            if process.exitcode is None and process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)

    def _on_signal(self, signum: int, frame) -> None:
        self.stop(f"received {signal.Signals(signum).name}")

    def run(self) -> int:
        """Run the workers until they exit; return 0 when all stopped cleanly after a stop signal."""
        config = self.config
        context = multiprocessing.get_context("spawn")
        with reserve_port(config.host, config.port) as port:
            config = dataclasses.replace(config, port=port)
            previous = {signum: signal.signal(signum, self._on_signal) for signum in STOP_SIGNALS}
            try:
                for index in range(config.workers):
                    process = context.Process(
                        target=run_worker, args=(config, index), name=f"rnnstream-worker-{index}"
                    )
                    process.start()
                    self.processes.append(process)
                    if self.stopping:
                        break
                logger.info(
                    "supervisor pid %d started %d workers on port %d: pids %s",
                    os.getpid(), len(self.processes), port,
                    ", ".join(str(process.pid) for process in self.processes),
                )
                self._wait()
            finally:
                for signum, handler in previous.items():
                    signal.signal(signum, handler)
        codes = [process.exitcode for process in self.processes]
        logger.info("all workers exited with codes %s", codes)
        return 1 if self.failed or any(code != 0 for code in codes) else 0

    def _wait(self) -> None:
        running = {process.sentinel: (index, process) for index, process in enumerate(self.processes)}
        while running:
            timeout = None
            if self.kill_deadline is not None:
                timeout = max(0.0, self.kill_deadline - time.monotonic())
            ready = multiprocessing.connection.wait(list(running), timeout)
            if not ready and self.kill_deadline is not None and time.monotonic() >= self.kill_deadline:
                for index, process in running.values():
                    logger.error("worker %d (pid %d) did not exit in time; killing it", index, process.pid)
                    process.kill()
                self.failed = True
                self.kill_deadline = None
                continue
            for sentinel in ready:
                index, process = running.pop(sentinel)
                process.join()
                level = logging.INFO if self.stopping else logging.ERROR
                logger.log(
                    level, "worker %d (pid %d) exited with code %s", index, process.pid, process.exitcode
                )
                if not self.stopping:
                    self.failed = True
                    self.stop(f"worker {index} exited")


def run_workers(config: ServerConfig) -> int:
    """Serve with config.workers processes on one port; return the exit status for the command line."""
    check_workers_config(config)
    return Supervisor(config).run()
