"""Run the real rnnstream CLI as a subprocess."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

PORT_PATTERN = re.compile(r"serving on \S+ \(port (\d+)\)")


class ServeProcess:
    """`rnnstream serve` in a child process; waits for its "serving on" log line to learn the port."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, timeout: float = 60) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "rnnstream.cli", "serve", "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.lines: list[str] = []
        self._port_found = threading.Event()
        self.port: int | None = None
        threading.Thread(target=self._read, daemon=True).start()
        if not self._port_found.wait(timeout):
            self.stop()
            raise RuntimeError("rnnstream serve did not start:\n" + self.log)
        self.target = f"127.0.0.1:{self.port}"

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            match = PORT_PATTERN.search(line)
            if match:
                self.port = int(match.group(1))
                self._port_found.set()
        self._port_found.set()

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def terminate(self, timeout: float = 30) -> int:
        self.process.terminate()
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def wait_for_log(self, text: str, timeout: float = 10) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log:
                return True
            time.sleep(0.05)
        return False


def run_cli(*args: str, timeout: float = 120, env: dict[str, str] | None = None, cwd: Path | None = None):
    return subprocess.run(
        [sys.executable, "-m", "rnnstream.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )
