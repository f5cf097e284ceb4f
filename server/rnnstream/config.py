"""Server settings: one table of options, each settable by flag or RNNSTREAM_* variable.

A flag given on the command line wins over the environment variable, which
wins over the default. Values from either source pass the same parser, so an
invalid value fails at start with the option's name.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path

BUNDLED_MODELS_DIR = Path(__file__).resolve().parent / "bundled"
LOG_LEVELS = ("debug", "info", "warning", "error")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"{value} is not a positive integer")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"{value} is negative")
    return value


def _float_in(low: float, high: float, low_open: bool = False):
    """Parse a finite float within [low, high], or (low, high] with low_open."""

    def parse(text: str) -> float:
        value = float(text)
        below = value <= low if low_open else value < low
        if not math.isfinite(value) or below or value > high:
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
            raise ValueError(f"{value} is outside {interval}")
        return value

    return parse


def _int_in(low: int, high: int):
    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise ValueError(f"{value} is outside [{low}, {high}]")
        return value

    return parse


# TTLs travel as uint32 seconds in the API.
MAX_TTL_SECONDS = 2**32 - 1


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError(f"{value} is not a port number (0 to 65535)")
    return value


# metrics_port value of --metrics-port auto: serve metrics on a free port, logged at start.
METRICS_PORT_AUTO = -1


def _metrics_port(text: str) -> int:
    return METRICS_PORT_AUTO if text == "auto" else _port(text)


def _choice(*choices: str):
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"{text!r} is not one of {', '.join(choices)}")
        return text

    return parse


def _optional_str(text: str) -> str | None:
    return text or None


@dataclass
class ServerConfig:
    models_dir: Path = BUNDLED_MODELS_DIR
    host: str = "127.0.0.1"
    port: int = 50051
    redis_url: str | None = None
    redis_timeout: float = 1.0
    device: str = "auto"
    log_level: str = "info"
    log_format: str = "text"
    max_batch: int = 64
    max_wait_ms: float = 2.0
    max_input_tokens: int = 8192
    max_generate_tokens: int = 4096
    max_chunk_tokens: int = 256
    torch_threads: int = 0
    default_ttl: int = 3600
    max_ttl: int = 7 * 24 * 3600
    grace: float = 10.0
    metrics_port: int = 0  # 0: off; METRICS_PORT_AUTO: a free port
    workers: int = 1


# field name -> (parser, help). Flags are --field-name, variables RNNSTREAM_FIELD_NAME.
OPTIONS: dict[str, tuple] = {
    "models_dir": (Path, "directory of model bundles to serve (default: the bundled models)"),
    "host": (str, "address to listen on (default 127.0.0.1; use 0.0.0.0 or :: for all interfaces)"),
    "port": (_port, "gRPC port (default 50051; 0 picks a free port)"),
    "redis_url": (
        _optional_str,
        "Redis URL for session state: redis://HOST:PORT/DB, rediss:// for TLS, "
        "redis+cluster://HOST:PORT[,HOST:PORT...] for Redis Cluster, "
        "redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB] for Sentinel "
        "(default: in-process store, single process, sessions lost on restart)",
    ),
    "redis_timeout": (_float_in(0, 60, low_open=True), "timeout in seconds of each Redis operation (default 1.0)"),
    "device": (str, "auto, cpu, cuda or cuda:N (default auto: cuda:0 when CUDA is available)"),
    "log_level": (_choice(*LOG_LEVELS), "debug, info, warning or error (default info)"),
    "log_format": (_choice("text", "json"), "text, or json for log shippers (default text)"),
    "max_batch": (_positive_int, "maximum sessions per model step (default 64; 1 turns batching off)"),
    "max_wait_ms": (_float_in(0, 1000), "maximum milliseconds a step waits for batch-mates (default 2.0)"),
    "max_input_tokens": (_positive_int, "maximum tokens in one request's input (default 8192)"),
    "max_generate_tokens": (_positive_int, "maximum max_tokens of one Generate call (default 4096)"),
    "torch_threads": (
        _int_in(0, 1024),
        "torch CPU threads for model steps (default 0: torch's default, one per core); on small "
        "machines 1 can be faster under load, see docs/benchmarks.md",
    ),
    "max_chunk_tokens": (
        _positive_int,
        "longest piece of one input run in a single model step; longer inputs take several steps, "
        "so they do not stall other sessions (default 256)",
    ),
    "default_ttl": (_int_in(1, MAX_TTL_SECONDS), "idle TTL in seconds of sessions that set none (default 3600)"),
    "max_ttl": (_int_in(1, MAX_TTL_SECONDS), "largest idle TTL in seconds a session may ask for (default 604800)"),
    "grace": (_float_in(0, 3600), "seconds in-flight calls get to finish on SIGTERM (default 10)"),
    "metrics_port": (
        _metrics_port,
        "Prometheus metrics HTTP port on the --host address (default 0: metrics off; auto picks a free port)",
    ),
    "workers": (
        _positive_int,
        "server processes sharing the port through SO_REUSEPORT (default 1); worker i serves metrics "
        "on metrics port + i and, with several CUDA devices, runs on cuda:(i mod device count)",
    ),
}


def env_name(field: str) -> str:
    return "RNNSTREAM_" + field.upper()


def add_server_options(parser: argparse.ArgumentParser) -> None:
    for field, (_, help_text) in OPTIONS.items():
        flag = "--" + field.replace("_", "-")
        parser.add_argument(flag, dest=field, default=None, metavar=field.upper(), help=f"{help_text} [{env_name(field)}]")


def resolve_config(args: argparse.Namespace, environ: dict[str, str] | None = None) -> ServerConfig:
    """Build the config from flags, then RNNSTREAM_* variables, then defaults; raise ValueError on a bad value."""
    environ = os.environ if environ is None else environ
    values = {}
    for field in fields(ServerConfig):
        parse = OPTIONS[field.name][0]
        raw = getattr(args, field.name, None)
        source = "--" + field.name.replace("_", "-")
        if raw is None and env_name(field.name) in environ:
            raw, source = environ[env_name(field.name)], env_name(field.name)
        if raw is None:
            continue
        try:
            values[field.name] = parse(raw)
        except ValueError as error:
            raise ValueError(f"invalid value {raw!r} for {source}: {error}") from error
    config = ServerConfig(**values)
    if config.default_ttl > config.max_ttl:
        raise ValueError(f"default TTL {config.default_ttl} s exceeds the maximum TTL {config.max_ttl} s")
    return config
