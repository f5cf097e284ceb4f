#!/usr/bin/env python3
"""Run the benchmark record: every row of docs/benchmarks.md in one run on this machine.

Starts its own redis-server on a free loopback port and two servers on the
same models, one batched (the default max batch) and one with --max-batch 1.
For each session count it measures the transport ceiling, then per model the
batched server (Step and StreamSession), the unbatched server, and the model
ceiling at the batched server's mean batch size. Then, per model, the Redis
round trip for its state size and prefill. Writes results.json and results.md
to --output and prints the Markdown tables.

    python scripts/run-benchmarks.py --output bench-results

Every bench runs as `rnnstream bench` in its own process, so the load
generator never shares an interpreter with a server.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SERVING_PATTERN = re.compile(r"serving on \S+ \(port (\d+)\)")
START_TIMEOUT_S = 120.0
# OpenMP, and so torch, reads it at start; one intra-op thread per process.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
BUNDLED = Path(__file__).resolve().parent.parent / "server" / "rnnstream" / "bundled"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Redis:
    def __init__(self, directory: Path) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            sys.exit("redis-server not found; install it (Debian: apt-get install redis-server)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = subprocess.Popen(
            [executable, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(directory)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(f"redis-server on port {self.port} did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


class Server:
    """`rnnstream serve` in a child process, with its metrics endpoint on a free port."""

    def __init__(self, name: str, models_dir: Path, redis_url: str, *extra: str, env: dict | None = None) -> None:
        self.name = name
        self.metrics_port = free_port()
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        command = [
            sys.executable, "-m", "rnnstream.cli", "serve", "--port", "0", "--models-dir", str(models_dir),
            "--redis-url", redis_url, "--metrics-port", str(self.metrics_port), "--grace", "1", *extra,
        ]
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})}
        )
        self.lines: list[str] = []
        found = threading.Event()
        self.port = 0

        def read() -> None:
            for line in self.process.stdout:
                self.lines.append(line)
                match = SERVING_PATTERN.search(line)
                if match:
                    self.port = int(match.group(1))
                    found.set()
            found.set()

        threading.Thread(target=read, daemon=True).start()
        if not found.wait(START_TIMEOUT_S) or not self.port:
            self.stop()
            raise RuntimeError(f"server {name} did not start:\n" + "".join(self.lines))
        self.target = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


class BenchFailed(RuntimeError):
    pass


def bench(*args: str, env: dict | None = None) -> dict:
    """Run `rnnstream bench ARGS --json FILE` and return the record; raise BenchFailed with its output on failure."""
    with tempfile.TemporaryDirectory() as directory:
        output = Path(directory) / "result.json"
        command = [sys.executable, "-m", "rnnstream.cli", "bench", *args, "--no-progress", "--json", str(output)]
        completed = subprocess.run(
            command, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})}
        )
        if completed.returncode != 0:
            raise BenchFailed(f"failed: {' '.join(command)}\n{completed.stdout}{completed.stderr}")
        return json.loads(output.read_text(encoding="utf-8"))


def machine() -> dict:
    import grpc
    import torch

    model_name = "unknown"
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
                break
    redis_version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.strip()
    return {
        "cpu": model_name,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "redis_server": redis_version,
        "platform": platform.platform(),
    }


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rows: list[dict] = []
        self.started = time.monotonic()

    def timing(self) -> list[str]:
        return ["--duration", str(self.args.duration), "--warmup", str(self.args.warmup)]

    def add(self, label: str, record: dict, **extra) -> dict:
        record = {"label": label, **extra, **record}
        self.rows.append(record)
        latency = record.get("latency_ms") or record.get("step_latency_ms") or {}
        p50 = latency.get("p50")
        print(
            f"[{time.monotonic() - self.started:5.0f} s] {label:<28} {record.get('model', ''):<10} "
            f"sessions {record.get('sessions', record.get('batch_size', '')):>4}: "
            f"{record.get('tokens_per_s', 0):10,.0f} tok/s, p50 {p50 if p50 is None else round(p50, 3)} ms",
            flush=True,
        )
        return record


def measure(args: argparse.Namespace, directory: Path, output: Path) -> dict:
    """Run every row; write each server's log to output/server-NAME.log, also when a row fails."""
    run = Run(args)
    redis = Redis(directory)
    servers: list[Server] = []
    try:
        batched = Server("batched", args.models_dir, redis.url)
        servers.append(batched)
        unbatched = Server("max batch 1", args.models_dir, redis.url, "--max-batch", "1")
        servers.append(unbatched)
        single_thread = Server("1 torch thread", args.models_dir, redis.url, env=ONE_THREAD)
        servers.append(single_thread)
        ceilings_done: set[tuple[str, int]] = set()
        for sessions in args.sessions:
            count = ["--sessions", str(sessions)]
            for mode in ("step", "stream"):
                run.add("transport ceiling", bench("--ceiling", "transport", "--mode", mode, *count, *run.timing()))
            for model in args.models:
                on_model = ["--model", model, *count, *run.timing()]
                step = run.add(
                    "server, batched",
                    bench("--target", batched.target, "--metrics-url", batched.metrics_url, *on_model),
                )
                run.add(
                    "server, batched",
                    bench("--target", batched.target, "--metrics-url", batched.metrics_url, "--mode", "stream",
                          *on_model),
                )
                run.add(
                    "server, max batch 1",
                    bench("--target", unbatched.target, "--metrics-url", unbatched.metrics_url, *on_model),
                )
                run.add(
                    "server, 1 torch thread",
                    bench("--target", single_thread.target, "--metrics-url", single_thread.metrics_url, *on_model),
                )
                batch = max(1, round(step["mean_batch_size"] or sessions))
                if (model, batch) not in ceilings_done:
                    ceilings_done.add((model, batch))
                    record = bench("--ceiling", "model", "--models-dir", str(args.models_dir), "--model", model,
                                   "--batch", str(batch), *run.timing())
                    run.add("model ceiling", record, sessions=sessions)
        for model in args.models:
            if (model, 1) not in ceilings_done:
                record = bench("--ceiling", "model", "--models-dir", str(args.models_dir), "--model", model,
                               "--batch", "1", *run.timing())
                run.add("model ceiling", record, sessions=1)
            state_bytes = str(state_size(args.models_dir, model))
            run.add("redis round trip", bench("--ceiling", "redis", "--redis-url", redis.url, "--state-bytes",
                                              state_bytes, "--duration", "2", "--warmup", "0.5"), model=model)
            prefill = ["--prefill", "--models-dir", str(args.models_dir), "--model", model]
            run.add("prefill", bench("--target", batched.target, *prefill))
            # Both sides with one torch thread: the server and the raw forward pass in the bench process.
            run.add("prefill, 1 torch thread", bench("--target", single_thread.target, *prefill, env=ONE_THREAD))
    finally:
        for server in servers:
            server.stop()
            log = output / f"server-{server.name.replace(' ', '-')}.log"
            log.write_text("".join(server.lines), encoding="utf-8")
        redis.stop()
    return {
        "machine": machine(),
        "settings": {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "sessions": args.sessions,
            "models": args.models,
            "models_dir": str(args.models_dir),
        },
        "elapsed_s": time.monotonic() - run.started,
        "rows": run.rows,
    }


def state_size(models_dir: Path, model: str) -> int:
    from rnnstream.bench.ceilings import find_bundle
    from rnnstream.state.codec import state_nbytes, state_shape

    config = find_bundle(models_dir, model).config
    return state_nbytes(state_shape(config.state_tensors, config.num_layers, config.hidden_size))


def find(rows: list[dict], label: str, model: str | None, sessions: int, mode: str = "step") -> dict | None:
    for row in rows:
        if row["label"] != label or row.get("sessions") != sessions:
            continue
        if model is not None and row.get("model") != model:
            continue
        if row.get("mode", "step") == mode:
            return row
    return None


def ratios(results: dict) -> list[dict]:
    """Return the targets of docs/benchmarks.md, each with its measured value and whether it was met."""
    rows = results["rows"]
    largest = max(results["settings"]["sessions"])
    checks = []
    for model in results["settings"]["models"]:
        batched = find(rows, "server, batched", model, largest)
        unbatched = find(rows, "server, max batch 1", model, largest)
        transport = find(rows, "transport ceiling", None, largest)
        if batched and unbatched:
            value = batched["tokens_per_s"] / unbatched["tokens_per_s"]
            checks.append({"model": model, "check": f"batched / max batch 1 at {largest} sessions",
                           "value": value, "target": ">= 4", "met": value >= 4})
        if batched and transport:
            value = batched["tokens_per_s"] / transport["tokens_per_s"]
            checks.append({"model": model, "check": f"batched / transport ceiling at {largest} sessions",
                           "value": value, "target": ">= 0.70", "met": value >= 0.7})
        stream = find(rows, "server, batched", model, largest, "stream")
        transport_stream = find(rows, "transport ceiling", None, largest, "stream")
        if stream and transport_stream:
            value = stream["tokens_per_s"] / transport_stream["tokens_per_s"]
            checks.append({"model": model, "check": f"stream / transport stream ceiling at {largest} sessions",
                           "value": value, "target": "-", "met": None})

        single = find(rows, "server, batched", model, 1)
        step = next((row for row in rows if row["label"] == "model ceiling" and row["model"] == model
                     and row["batch_size"] == 1), None)
        redis = next((row for row in rows if row["label"] == "redis round trip" and row.get("model") == model), None)
        transport_single = find(rows, "transport ceiling", None, 1)
        if single and step and redis and transport_single:
            parts = {
                "model step at batch 1": step["step_latency_ms"]["p50"],
                "two Redis round trips": 2 * redis["hgetall_ms"]["p50"],
                "transport round trip": transport_single["latency_ms"]["p50"],
            }
            expected = sum(parts.values())
            server = single["latency_ms"]["p50"]
            checks.append({"model": model, "check": "1-session p50 minus (step + 2 Redis + transport), ms",
                           "value": server - expected, "target": "<= 1 ms", "met": server - expected <= 1.0,
                           "parts_ms": parts, "sum_ms": expected, "server_p50_ms": server,
                           "server_means_ms": single.get("server")})
        single_thread = find(rows, "server, 1 torch thread", model, largest)
        if single_thread and transport:
            value = single_thread["tokens_per_s"] / transport["tokens_per_s"]
            checks.append({"model": model, "check": f"1 torch thread / transport ceiling at {largest} sessions",
                           "value": value, "target": "-", "met": None})
        for label, target in (("prefill", ">= 0.80"), ("prefill, 1 torch thread", "-")):
            prefill = next((row for row in rows if row["label"] == label and row["model"] == model), None)
            if prefill:
                value = prefill["server_to_raw"]
                checks.append({"model": model, "check": f"{label}, {prefill['tokens']} tokens: server / raw forward",
                               "value": value, "target": target, "met": value >= 0.8 if target != "-" else None})
    return checks


def cell(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def markdown(results: dict) -> str:
    rows = results["rows"]
    lines = [
        "| model | sessions | row | mode | mean batch | tokens/s | p50 ms | p95 ms | p99 ms | errors |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if row["label"] == "redis round trip" or row["label"].startswith("prefill"):
            continue
        latency = row.get("latency_ms") or row.get("step_latency_ms")
        batch = row.get("mean_batch_size") if row["label"] != "model ceiling" else row["batch_size"]
        label = row["label"] + (" (step latency)" if row["label"] == "model ceiling" else "")
        lines.append(
            f"| {row.get('model') if row['label'] != 'transport ceiling' else '-'} | {row.get('sessions')} | {label} "
            f"| {row.get('mode', '-')} | {cell(batch)} | {cell(row['tokens_per_s'])} | {cell(latency['p50'])} "
            f"| {cell(latency['p95'])} | {cell(latency['p99'])} | {cell(row.get('errors', '-'))} |"
        )
    lines += ["", "| model | check | measured | target | met |", "|---|---|---:|---|---|"]
    for check in results["checks"]:
        lines.append(
            f"| {check['model']} | {check['check']} | {cell(check['value'])} | {check['target']} | {cell(check['met'])} |"
        )
    lines += ["", "| model | model step p50 ms | 2 x Redis HGETALL p50 ms | transport p50 ms | sum ms | server p50 ms "
              "| server's mean queue wait / load / step / save ms |",
              "|---|---:|---:|---:|---:|---:|---|"]
    for check in results["checks"]:
        if "parts_ms" in check:
            parts = list(check["parts_ms"].values())
            means = check.get("server_means_ms") or {}
            phases = " / ".join(
                cell(means.get(key)) for key in ("mean_queue_wait_ms", "mean_load_ms", "mean_step_ms", "mean_save_ms")
            )
            lines.append(
                f"| {check['model']} | {cell(parts[0])} | {cell(parts[1])} | {cell(parts[2])} "
                f"| {cell(check['sum_ms'])} | {cell(check['server_p50_ms'])} | {phases} |"
            )
    lines += ["", "| model | row | prefill tokens | server ms | raw forward ms | server tokens/s | raw tokens/s |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        if row["label"].startswith("prefill"):
            lines.append(
                f"| {row['model']} | {row['label']} | {row['tokens']} | {cell(row['server_ms']['p50'])} "
                f"| {cell(row['raw_forward_ms']['p50'])} | {cell(row['server_tokens_per_s'])} "
                f"| {cell(row['raw_tokens_per_s'])} |"
            )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models-dir", type=Path, default=BUNDLED, help="bundles to serve (default: the bundled models)")
    parser.add_argument("--models", nargs="+", default=["en-lstm", "en-gru"], help="models to measure")
    parser.add_argument("--sessions", nargs="+", type=int, default=[1, 16, 64, 256], help="session counts")
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per row (default 8)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each row (default 2)")
    parser.add_argument("--output", type=Path, default=Path("bench-results"), help="directory for results.json/.md")
    args = parser.parse_args()
    args.sessions = sorted(set(args.sessions))

    args.output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rnnstream-bench-") as directory:
        try:
            results = measure(args, Path(directory), args.output)
        except BenchFailed as error:
            print(error, file=sys.stderr)
            print(f"server logs are in {args.output}", file=sys.stderr)
            return 1
    results["checks"] = ratios(results)
    (args.output / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    table = markdown(results)
    (args.output / "results.md").write_text(table, encoding="utf-8")
    print()
    print(table)
    print(f"wrote {args.output / 'results.json'} and {args.output / 'results.md'} in {results['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
