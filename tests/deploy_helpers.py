"""The deployment files (docker-compose.yml, Dockerfile, nginx.conf) and a real nginx on loopback."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import grpc
import pytest
import yaml
from rnnstream_client._proto.rnnstream.v1 import rnnstream_pb2 as pb
from rnnstream_client._proto.rnnstream.v1 import rnnstream_pb2_grpc as pb_grpc

from rnnstream.api.served_by import SERVED_BY_KEY

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
NGINX_CONF = ROOT / "deploy" / "nginx" / "nginx.conf"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)


def load_compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs of the Dockerfile, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text = pending + stripped
        pending = ""
        keyword, _, arguments = text.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def nginx_upstream_servers(conf: str) -> list[tuple[str, int]]:
    servers = re.findall(r"^\s*server\s+([\w.-]+):(\d+)\b[^;]*;", conf, re.M)
    return [(host, int(port)) for host, port in servers]


def nginx_listen_ports(conf: str) -> list[int]:
    return [int(port) for port in re.findall(r"^\s*listen\s+(?:[\d.]+:)?(\d+)\b", conf, re.M)]


def substitute_once(pattern: str, replacement: str, text: str) -> str:
    """re.sub that fails the test unless the pattern matches exactly once, so config drift is noticed."""
    result, count = re.subn(pattern, replacement, text, flags=re.M)
    assert count == 1, f"expected one match of {pattern!r} in {NGINX_CONF.name}, found {count}"
    return result


def loopback_nginx_conf(directory: Path, upstreams: list[str], listen_port: int) -> Path:
    """Write the compose nginx.conf adapted to run here: loopback addresses and files in `directory`.

    Only what is specific to Docker changes. The upstream server line becomes
    one line per loopback address with the same parameters, nginx listens on
    127.0.0.1, and the logs and temporary files move into `directory`.
    """
    conf = NGINX_CONF.read_text()
    match = re.search(r"^(\s*)server\s+rnnstream:\d+(\b[^;]*);", conf, re.M)
    assert match, "nginx.conf has no `server rnnstream:PORT ...;` line in its upstream"
    indent, parameters = match.group(1), match.group(2)
    lines = "".join(f"{indent}server {address}{parameters};" for address in upstreams)
    conf = conf[: match.start()] + lines.lstrip("\n") + conf[match.end() :]
    conf = substitute_once(r"^(\s*)listen\s+\d+(\s)", rf"\g<1>listen 127.0.0.1:{listen_port}\g<2>", conf)
    conf = substitute_once(r"access_log\s+/dev/stdout", f"access_log {directory / 'access.log'}", conf)
    conf = substitute_once(r"^error_log\s+stderr", f"error_log {directory / 'error.log'}", conf)
    kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    temp_paths = "".join(f"    {kind}_temp_path {directory / kind};\n" for kind in kinds)
    conf = substitute_once(r"^http \{\n", "http {\n" + temp_paths, conf)
    path = directory / "nginx.conf"
    path.write_text(conf)
    return path


def nginx_command(directory: Path, conf: Path, *args: str) -> list[str]:
    if NGINX is None:
        pytest.fail("nginx is not installed; .ci/run installs Debian's nginx package with apt-get")
    # pid file in `directory`; as root, workers keep root's rights to reach the test's private temp files.
    globals_ = f"pid {directory / 'nginx.pid'}; daemon off;" + (" user root;" if os.geteuid() == 0 else "")
    error_log = str(directory / "error.log")
    return [NGINX, "-p", str(directory), "-c", str(conf), "-e", error_log, "-g", globals_, *args]


class NginxProcess:
    """nginx in the foreground, balancing gRPC over loopback replicas with the compose nginx.conf."""

    def __init__(self, directory: Path, upstreams: list[str], port: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.port = port
        self.target = f"127.0.0.1:{port}"
        conf = loopback_nginx_conf(directory, upstreams, port)
        self.process = subprocess.Popen(
            nginx_command(directory, conf), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"nginx did not start:\n{self.error_log}")
                time.sleep(0.05)

    @property
    def error_log(self) -> str:
        path = self.directory / "error.log"
        return path.read_text() if path.exists() else ""

    def access_log_lines(self) -> list[str]:
        path = self.directory / "access.log"
        return path.read_text().splitlines() if path.exists() else []

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def served_by(call: grpc.Call) -> str:
    """The rnnstream-served-by value (HOSTNAME/PID) from a call's initial metadata."""
    values = [value for key, value in call.initial_metadata() if key == SERVED_BY_KEY]
    assert len(values) == 1, f"expected one {SERVED_BY_KEY} header, got {call.initial_metadata()}"
    return values[0]


def served_by_pid(call: grpc.Call) -> int:
    return int(served_by(call).rsplit("/", 1)[1])


def list_models_pid(target: str) -> int:
    """Call ListModels on a new connection and return the pid of the process that served it."""
    with grpc.insecure_channel(target) as channel:
        _, call = pb_grpc.RnnStreamStub(channel).ListModels.with_call(pb.ListModelsRequest(), timeout=10)
    return served_by_pid(call)
