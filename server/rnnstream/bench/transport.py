"""The transport ceiling: an RnnStream servicer with no model and no store.

It uses the same messages as the real server but replies to every step with a
fixed top-5 and a log-probability of -1 per input token, keeping only each
session's position in a dict. Driving it with the load generator measures what
gRPC and protobuf cost on both ends, which bounds what the real server can
reach on the same machine.

`python -m rnnstream.bench.transport --port 0` runs it as its own process, so
that, like the real server, it does not share an interpreter with the load
generator; it prints "listening on port N" once it accepts calls.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import queue
import re
import secrets
import signal
import subprocess
import sys
import threading

import grpc
from rnnstream_client._proto.rnnstream.v1 import rnnstream_pb2 as pb
from rnnstream_client._proto.rnnstream.v1 import rnnstream_pb2_grpc as pb_grpc

READY_PATTERN = re.compile(r"listening on port (\d+)")
START_TIMEOUT_S = 60.0
VOCAB_SIZE = 256
FIXED_TOP = [
    pb.TokenPrediction(token_id=token, text=chr(token), token_bytes=bytes((token,)), logprob=logprob)
    for token, logprob in ((32, -1.2), (101, -1.9), (116, -2.3), (97, -2.6), (111, -2.8))
]


class FixedReplyServicer(pb_grpc.RnnStreamServicer):
    """Serve one model name; each step returns FIXED_TOP and advances the session's position, with no model."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.positions: dict[str, int] = {}

    async def ListModels(self, request, context):
        info = pb.ModelInfo(
            name=self.model, architecture="none", vocab_size=VOCAB_SIZE, device="none", tokenizer="byte"
        )
        return pb.ListModelsResponse(models=[info])

    async def CreateSession(self, request, context):
        session_id = request.session_id or secrets.token_hex(16)
        position = len(request.prompt_token_ids) + len(request.prompt.encode("utf-8"))
        self.positions[session_id] = position
        return pb.CreateSessionResponse(session_id=session_id, position=position)

    async def Step(self, request, context):
        return self._step(request)

    async def StreamSession(self, request_iterator, context):
        async for request in request_iterator:
            yield self._step(request)

    async def DeleteSession(self, request, context):
        self.positions.pop(request.session_id, None)
        return pb.DeleteSessionResponse()

    def _step(self, request: pb.StepRequest) -> pb.StepResponse:
        tokens = list(request.token_ids) if request.token_ids else list(request.text.encode("utf-8"))
        position = self.positions.get(request.session_id, 0) + len(tokens)
        self.positions[request.session_id] = position
        return pb.StepResponse(
            session_id=request.session_id,
            position=position,
            next_tokens=FIXED_TOP,
            input_logprobs=[-1.0] * len(tokens),
            input_token_ids=tokens,
        )


async def serve(model: str, host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT; print the bound port once started."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_RnnStreamServicer_to_server(FixedReplyServicer(model), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    bound = server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"could not listen on {address}")
    await server.start()
    print(f"listening on port {bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(0)


class TransportServer:
    """The fixed-reply server in a child process on a free loopback port; a context manager."""

    def __init__(self, model: str, host: str = "127.0.0.1") -> None:
        self.model = model
        self.host = host
        self.process: subprocess.Popen | None = None
        self.port = 0

    @property
    def target(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def start(self) -> TransportServer:
        command = [sys.executable, "-m", "rnnstream.bench.transport", "--model", self.model, "--host", self.host]
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
        line = self._first_line()
        match = READY_PATTERN.search(line)
        if match is None:
            self.stop()
            raise RuntimeError(f"transport server did not start; it printed {line!r}")
        self.port = int(match.group(1))
        return self

    def _first_line(self) -> str:
        """Return the child's first output line, or "" if it prints none within START_TIMEOUT_S."""
        assert self.process is not None and self.process.stdout is not None
        lines: queue.Queue[str] = queue.Queue()
        stdout = self.process.stdout
        threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
        try:
            return lines.get(timeout=START_TIMEOUT_S)
        except queue.Empty:
            return ""

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        with contextlib.suppress(OSError):
            self.process.stdout.close()
        self.process = None

    def __enter__(self) -> TransportServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve RnnStream with fixed replies, for the transport ceiling.")
    parser.add_argument("--model", default="transport", help="model name to list (default transport)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port (default 0: a free port)")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.model, args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
