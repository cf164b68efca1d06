"""`layerexit serve` in a subprocess on a free loopback port, for scripts, benchmarks and tests that need a real
server: start it, wait for ``/health``, read ``/metrics``, stop it with SIGTERM (a graceful drain).

Standard library only (no HTTP client, no FastAPI in this process). The server's output goes to a temporary
file, never to an unread pipe that could fill up and block it; a server that exits early raises with its last
lines.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``layerexit serve --port <free port> --log-level warning *args`` in a subprocess; ``url`` is its address.

    ``wait=True`` blocks until ``/health`` answers (or raises after ``timeout`` seconds); ``env`` adds to this
    process's environment. Use as a context manager to stop it on exit.
    """

    def __init__(self, *args: str, name: str = "server", env: dict[str, str] | None = None, wait: bool = True,
                 timeout: float = 120.0):
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.output = tempfile.TemporaryFile("w+", encoding="utf-8")
        command = [sys.executable, "-m", "layerexit.cli.main", "serve", "--port", str(self.port),
                   "--log-level", "warning", *args]
        self.proc = subprocess.Popen(command, env={**os.environ, **(env or {})}, stdout=self.output,
                                     stderr=subprocess.STDOUT, text=True)
        if wait:
            self.wait(timeout)

    def wait(self, timeout: float = 120.0) -> None:
        """Block until ``/health`` answers 200; raise (stopping the server) if it exits or does not start."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.last_output()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1.0) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.name} did not start within {timeout:g} s: {self.last_output()}")

    def metrics(self) -> dict[str, float]:
        """The Prometheus text of ``/metrics`` as {sample name with labels: value}."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as response:
            text = response.read().decode("utf-8")
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    def last_output(self, chars: int = 2000) -> str:
        """The end of what the server wrote (stdout and stderr)."""
        self.output.flush()
        self.output.seek(0)
        return self.output.read()[-chars:]

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (the server answers what it accepted, then exits), SIGKILL after ``timeout``; the exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
