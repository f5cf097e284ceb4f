"""The rnnstream command: serve, train, and client commands (complete, generate, chat)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .bench.command import add_bench_parser
from .cli_client import add_chat_parser, add_complete_parser, add_generate_parser, client_target

logger = logging.getLogger(__name__)


def add_train_parser(commands) -> None:
    parser = commands.add_parser("train", help="train an LSTM or GRU language model and write a bundle")
    parser.add_argument("corpus", type=Path, help="text file, or directory of text files, to train on")
    parser.add_argument("--output", "-o", type=Path, required=True, help="bundle directory to write")
    parser.add_argument("--arch", choices=("lstm", "gru"), default="lstm", help="recurrent architecture")
    parser.add_argument("--name", help="model name (default: the output directory's name)")
    parser.add_argument("--embedding-size", type=int, default=128)
    parser.add_argument("--hidden-size", type=int, default=384)
    parser.add_argument("--layers", type=int, default=2, help="number of recurrent layers")
    parser.add_argument("--dropout", type=float, default=0.0, help="dropout between layers while training")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=128, help="training window length in tokens")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak Adam learning rate")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, help="training time budget in minutes (default 10)")
    budget.add_argument("--steps", type=int, help="number of optimizer steps instead of a time budget")
    parser.add_argument("--holdout", type=float, default=0.02, help="fraction of each file held out for scoring")
    parser.add_argument("--bf16", action="store_true", help="use bfloat16 autocast on the CPU (faster, same loss)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(handler=run_train)


def run_train(args: argparse.Namespace) -> int:
    from .training import TrainOptions, train

    minutes = args.minutes
    if args.steps is None and minutes is None:
        minutes = 10.0  # the default budget when neither --steps nor --minutes is given
    options = TrainOptions(
        corpus=args.corpus,
        output=args.output,
        architecture=args.arch,
        name=args.name,
        embedding_size=args.embedding_size,
        hidden_size=args.hidden_size,
        num_layers=args.layers,
        dropout=args.dropout,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        learning_rate=args.lr,
        minutes=minutes,
        steps=args.steps,
        holdout_fraction=args.holdout,
        bf16=args.bf16,
        threads=args.threads,
        seed=args.seed,
        progress=not args.no_progress,
    )
    try:
        record = train(options)
    except (ValueError, OSError) as error:
        print(f"rnnstream train: {error}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.output}: held-out {record['holdout_bits_per_char']:.3f} bits per character, "
        f"unigram {record['unigram_bits_per_char']:.3f}, {record['parameters']:,} parameters"
    )
    return 0


def add_serve_parser(commands) -> None:
    from .config import add_server_options

    parser = commands.add_parser(
        "serve",
        help="serve the model bundles in a directory over gRPC",
        description="Serve every model bundle in a directory over gRPC. Each option can also be set "
        "by the RNNSTREAM_* environment variable in brackets; a flag wins over the variable.",
    )
    add_server_options(parser)
    parser.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    import asyncio

    from .config import resolve_config
    from .logs import configure_logging

    try:
        config = resolve_config(args)
    except ValueError as error:
        print(f"rnnstream serve: {error}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, config.log_format)
    if config.workers > 1:
        from .api.workers import run_workers

        try:
            return run_workers(config)
        except (ValueError, OSError) as error:
            logger.error("cannot start: %s", error)
            return 1
    from .api.server import serve

    try:
        asyncio.run(serve(config))
    except (ValueError, OSError) as error:
        logger.error("cannot start: %s", error)
        return 1
    return 0


def add_health_parser(commands) -> None:
    parser = commands.add_parser(
        "health",
        help="ask a server's gRPC health service for its status; exit 0 when it is SERVING",
        description="Call grpc.health.v1.Health/Check and print the status. Exit status 0 means SERVING; "
        "1 means any other status or a failed call. Suitable for container health checks.",
    )
    parser.add_argument("--service", default="", help="service name to check (default: the whole server)")
    parser.add_argument(
        "--target", default=None, help="server address host:port (default 127.0.0.1:50051) [RNNSTREAM_TARGET]"
    )
    parser.add_argument("--timeout", type=float, default=5.0, help="deadline of the check in seconds (default 5)")
    parser.set_defaults(handler=run_health)


def run_health(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target = client_target(args)
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as error:
            print(f"rnnstream health: {target}: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{target}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rnnstream", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(commands)
    add_complete_parser(commands)
    add_generate_parser(commands)
    add_chat_parser(commands)
    add_health_parser(commands)
    add_train_parser(commands)
    add_bench_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "serve":
        from .logs import configure_logging

        configure_logging("info")
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
