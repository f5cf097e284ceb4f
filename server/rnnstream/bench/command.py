"""`rnnstream bench`: closed-loop load against a server, or one of the ceilings it is measured against.

Without --ceiling or --prefill it drives the server at --target. Each run
prints one table row to stdout and, with --json FILE, writes the same record
as JSON.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import MODES

CEILINGS = ("model", "transport", "redis")
DEFAULT_STATE_BYTES = 6144  # the bundled LSTM's state: 2 x 2 layers x 384 hidden x 4 bytes

LOAD_COLUMNS = [
    ("kind", "kind"),
    ("model", "model"),
    ("mode", "mode"),
    ("sessions", "sessions"),
    ("batch", "mean_batch_size"),
    ("tokens", "tokens"),
    ("tokens/s", "tokens_per_s"),
    ("p50 ms", "latency_ms.p50"),
    ("p95 ms", "latency_ms.p95"),
    ("p99 ms", "latency_ms.p99"),
    ("errors", "errors"),
]
MODEL_COLUMNS = [
    ("kind", "kind"),
    ("model", "model"),
    ("batch", "batch_size"),
    ("steps", "steps"),
    ("tokens/s", "tokens_per_s"),
    ("step p50 ms", "step_latency_ms.p50"),
    ("step p95 ms", "step_latency_ms.p95"),
    ("step p99 ms", "step_latency_ms.p99"),
]
REDIS_COLUMNS = [
    ("kind", "kind"),
    ("state bytes", "state_bytes"),
    ("HGETALL p50 ms", "hgetall_ms.p50"),
    ("HGETALL p99 ms", "hgetall_ms.p99"),
    ("PING p50 ms", "ping_ms.p50"),
]
PREFILL_COLUMNS = [
    ("kind", "kind"),
    ("model", "model"),
    ("tokens", "tokens"),
    ("server ms", "server_ms.p50"),
    ("raw ms", "raw_forward_ms.p50"),
    ("server tokens/s", "server_tokens_per_s"),
    ("raw tokens/s", "raw_tokens_per_s"),
    ("server/raw", "server_to_raw"),
]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{value} is not a non-negative number")
    return value


def add_bench_parser(commands) -> None:
    from ..cli_client import add_client_options

    parser = commands.add_parser(
        "bench",
        help="measure a server's throughput and latency under concurrent sessions, or a ceiling to compare it with",
        description=__doc__.split("\n\n", 1)[1].replace("\n", " "),
    )
    add_bench_options(parser)
    add_client_options(parser)
    parser.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace) -> int:
    from ..cli_client import client_target

    return run_bench(args, client_target(args))


def add_bench_options(parser: argparse.ArgumentParser) -> None:
    from ..config import BUNDLED_MODELS_DIR

    kind = parser.add_mutually_exclusive_group()
    kind.add_argument(
        "--ceiling",
        choices=CEILINGS,
        help="measure a ceiling instead of the server: model (ModelRunner.step in this process at --batch), "
        "transport (a fixed-reply gRPC server started here, driven like the real one), or redis "
        "(HGETALL and PING round trips to --redis-url)",
    )
    kind.add_argument(
        "--prefill",
        action="store_true",
        help="time a --prefill-chars text in one Step call through the server against the model's forward pass here",
    )
    parser.add_argument("--model", "-m", help="model name (default: the first model the server lists)")
    parser.add_argument("--sessions", "-n", type=_positive_int, default=16, help="concurrent sessions (default 16)")
    parser.add_argument("--mode", choices=MODES, default="step", help="step: one Step call per token; "
                        "stream: one StreamSession stream per session, one message per token (default step)")
    parser.add_argument("--duration", type=_positive_float, default=10.0, help="measured seconds (default 10)")
    parser.add_argument("--warmup", type=_non_negative_float, default=2.0, help="unmeasured seconds first (default 2)")
    parser.add_argument("--channels", type=_positive_int, default=1, help="gRPC channels the sessions share (default 1)")
    parser.add_argument("--top-k", type=int, default=5, help="next-token predictions per reply (default 5)")
    parser.add_argument(
        "--no-position-check",
        action="store_true",
        help="send steps without expected_position (by default each step carries it, as the SDK does)",
    )
    parser.add_argument(
        "--metrics-url",
        help="the server's Prometheus endpoint, e.g. http://127.0.0.1:9100/metrics, to report its mean batch size "
        "(without it the batch size is not reported)",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the result as JSON to FILE")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    ceiling = parser.add_argument_group("ceilings and prefill")
    ceiling.add_argument(
        "--models-dir", type=Path, default=BUNDLED_MODELS_DIR, help="bundles for --ceiling model and --prefill "
        "(default: the bundled models)"
    )
    ceiling.add_argument("--batch", type=_positive_int, default=1, help="batch size of --ceiling model (default 1)")
    ceiling.add_argument("--device", default="cpu", help="device of --ceiling model and --prefill (default cpu)")
    ceiling.add_argument("--redis-url", help="Redis for --ceiling redis, e.g. redis://127.0.0.1:6379/0")
    ceiling.add_argument(
        "--state-bytes", type=_positive_int, default=DEFAULT_STATE_BYTES,
        help=f"value size of --ceiling redis in bytes (default {DEFAULT_STATE_BYTES}, the bundled LSTM's state)",
    )
    ceiling.add_argument("--prefill-chars", type=_positive_int, default=2000, help="prefill text length (default 2000)")
    ceiling.add_argument("--repeats", type=_positive_int, default=5, help="timed prefill runs per side (default 5)")


def load_record(result, options, kind: str) -> dict:
    """Return the record of a load run: throughput, latency percentiles, errors and the server's batch statistics."""
    from .report import latency_summary_ms

    server = result.server.summary() if result.server is not None else None
    return {
        "kind": kind,
        "target": options.target,
        "model": result.model,
        "mode": result.mode,
        "sessions": result.sessions,
        "channels": options.channels,
        "position_check": options.check_position,
        "window_s": result.window_s,
        "tokens": result.tokens,
        "tokens_per_s": result.tokens / result.window_s,
        "latency_ms": latency_summary_ms(result.latencies_s),
        "errors": sum(result.errors.values()),
        "errors_by_code": result.errors,
        # The server's mean sessions per model step over the window; None without --metrics-url.
        "mean_batch_size": server["mean_batch_size"] if server else None,
        "server": server,
    }


def run_bench(args: argparse.Namespace, target: str) -> int:
    """Run the benchmark the arguments select, print its table row, and write --json; return the exit status."""
    from .ceilings import model_ceiling, prefill, redis_round_trip
    from .report import format_table, write_json

    try:
        if args.ceiling == "model":
            if args.model is None:
                raise ValueError("--ceiling model needs --model")
            record = model_ceiling(args.models_dir, args.model, args.batch, args.duration, args.warmup, args.device)
            columns = MODEL_COLUMNS
        elif args.ceiling == "redis":
            if args.redis_url is None:
                raise ValueError("--ceiling redis needs --redis-url")
            record = redis_round_trip(args.redis_url, args.state_bytes, args.duration, args.warmup)
            columns = REDIS_COLUMNS
        elif args.prefill:
            if args.model is None:
                raise ValueError("--prefill needs --model")
            record = prefill(
                target, args.models_dir, args.model, args.prefill_chars, args.repeats, args.timeout, args.device
            )
            columns = PREFILL_COLUMNS
        else:
            record = _run_load(args, target)
            columns = LOAD_COLUMNS
    except (ValueError, RuntimeError, OSError) as error:
        print(f"rnnstream bench: {error}", file=sys.stderr)
        return 1
    print(format_table([record], columns))
    if record["kind"] == "server" and record["mean_batch_size"] is None:
        print("batch: not reported; pass --metrics-url to read the server's mean batch size")
    if args.json is not None:
        write_json(record, args.json)
    return 0


def _run_load(args: argparse.Namespace, target: str) -> dict:
    import grpc

    from .loadgen import LoadOptions, run_load
    from .transport import TransportServer

    options = LoadOptions(
        target=target,
        sessions=args.sessions,
        duration_s=args.duration,
        warmup_s=args.warmup,
        model=args.model,
        mode=args.mode,
        channels=args.channels,
        top_k=args.top_k,
        timeout_s=args.timeout,
        check_position=not args.no_position_check,
        metrics_url=args.metrics_url,
        progress=not args.no_progress,
    )
    try:
        if args.ceiling == "transport":
            options.metrics_url = None  # the fixed-reply server has no metrics
            with TransportServer(args.model or "transport") as server:
                options.target = server.target
                return load_record(run_load(options), options, "transport")
        return load_record(run_load(options), options, "server")
    except grpc.RpcError as error:
        raise RuntimeError(f"server {options.target} failed: {error.code().name}: {error.details()}") from error
