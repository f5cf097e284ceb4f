"""Client subcommands of the rnnstream CLI: complete, generate and chat.

They use only the SDK (rnnstream_client), never the server's modules.
"""

from __future__ import annotations

import argparse
import math
import os
import sys


def add_client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target", default=None, help="server address host:port (default 127.0.0.1:50051) [RNNSTREAM_TARGET]"
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="deadline of each call in seconds (default 30)")


def add_model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", help="model name (default: the first model the server lists)")


def client_target(args: argparse.Namespace) -> str:
    return args.target or os.environ.get("RNNSTREAM_TARGET") or "127.0.0.1:50051"


def _non_empty(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("text is empty")
    return text


def _delete_quietly(session) -> None:
    """Delete a session the command opened; a failure here must not hide the command's own error."""
    from rnnstream_client import RnnstreamError

    try:
        session.delete()
    except RnnstreamError as error:
        print(f"could not delete session {session.id}: {error}", file=sys.stderr)


def _model_name(client, args: argparse.Namespace) -> str:
    return args.model or client.list_models()[0].name


def add_complete_parser(commands) -> None:
    parser = commands.add_parser(
        "complete", help="open a session, send text, and print the most likely next tokens"
    )
    parser.add_argument("text", type=_non_empty, help="text to send")
    parser.add_argument("--top-k", type=int, default=5, help="number of next tokens to print (default 5)")
    parser.add_argument("--chunk", type=int, default=0, help="send the text in steps of this many characters")
    add_model_option(parser)
    add_client_options(parser)
    parser.set_defaults(handler=run_complete)


def run_complete(args: argparse.Namespace) -> int:
    from rnnstream_client import Client, RnnstreamError

    try:
        with Client(client_target(args), timeout=args.timeout) as client:
            model = _model_name(client, args)
            session = client.create_session(model)
            try:
                chunk = args.chunk if args.chunk > 0 else len(args.text)
                logprob_sum = 0.0
                for start in range(0, len(args.text), chunk):
                    result = session.step(args.text[start : start + chunk], top_k=args.top_k)
                    logprob_sum += sum(result.input_logprobs)
            finally:
                _delete_quietly(session)
    except RnnstreamError as error:
        print(f"rnnstream complete: {error}", file=sys.stderr)
        return 1
    bits = -logprob_sum / math.log(2)
    print(f"model {model}, session {session.id}, position {result.position}")
    print(f"text scored {bits:.1f} bits ({bits / len(args.text):.2f} bits per character)")
    for prediction in result.next_tokens:
        print(f"{math.exp(prediction.logprob):8.4f}  {prediction.token_id:5d}  {prediction.token_bytes!r}")
    return 0


def add_sampling_options(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    parser.add_argument("--max-tokens", type=int, default=max_tokens, help=f"tokens to sample (default {max_tokens})")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 is greedy (default 0.8)")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (default 0: all)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling probability (default: off)")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    parser.add_argument("--stop", action="append", default=[], help="stop after this string (repeatable)")


def _sampling(args: argparse.Namespace) -> dict:
    return {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "seed": args.seed,
        "stop": args.stop,
    }


def add_generate_parser(commands) -> None:
    parser = commands.add_parser("generate", help="stream sampled text that continues a prompt")
    parser.add_argument("prompt", type=_non_empty, help="text to continue")
    add_sampling_options(parser, max_tokens=200)
    add_model_option(parser)
    add_client_options(parser)
    parser.set_defaults(handler=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from rnnstream_client import Client, RnnstreamError

    try:
        with Client(client_target(args), timeout=args.timeout) as client:
            session = client.create_session(_model_name(client, args), prompt=args.prompt)
            try:
                for index, chunk in enumerate(session.generate(**_sampling(args))):
                    sys.stdout.write((args.prompt if index == 0 else "") + chunk.text)
                    sys.stdout.flush()
                sys.stdout.write("\n")
            finally:
                _delete_quietly(session)
    except RnnstreamError as error:
        print(f"\nrnnstream generate: {error}", file=sys.stderr)
        return 1
    return 0


def add_chat_parser(commands) -> None:
    parser = commands.add_parser(
        "chat",
        help="type lines into one session and stream the model's continuation of each",
        description="Each line you type is fed to the session followed by a newline; the model then "
        "continues until it writes a newline or reaches --max-tokens. End with Ctrl-D.",
    )
    parser.add_argument("--session", help="continue this existing session instead of opening one")
    parser.add_argument("--keep", action="store_true", help="keep the session at exit (its id is printed)")
    add_sampling_options(parser, max_tokens=300)
    add_model_option(parser)
    add_client_options(parser)
    parser.set_defaults(handler=run_chat)


def run_chat(args: argparse.Namespace) -> int:
    from rnnstream_client import Client, RnnstreamError

    sampling = _sampling(args)
    sampling["stop"] = sampling["stop"] or ["\n"]
    interactive = sys.stdin.isatty()
    try:
        with Client(client_target(args), timeout=args.timeout) as client:
            if args.session:
                session = client.session(args.session)
                session.position = session.info().position
            else:
                session = client.create_session(_model_name(client, args))
            print(f"session {session.id} (model {session.model or session.info().model}); end with Ctrl-D")
            turn = 0
            while True:
                if interactive:
                    sys.stdout.write("> ")
                    sys.stdout.flush()
                line = sys.stdin.readline()
                if not line:
                    break
                text = line.rstrip("\n") + "\n"
                if args.seed is not None:
                    sampling["seed"] = args.seed + turn  # reproducible, but not the same draws every turn
                turn += 1
                for chunk in session.generate(prompt=text, **sampling):
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
                if not chunk.text.endswith("\n"):
                    sys.stdout.write("\n")
            if args.keep or args.session:
                print(f"session {session.id} kept at position {session.position}")
            else:
                session.delete()
    except RnnstreamError as error:
        print(f"rnnstream chat: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
