"""Run a bootstrap service or a redis-server as a child process on loopback (tests, bench, launchers).

Each child gets its own session (process group), so `stop()` reaches Granian's worker too; output
goes to a log file (never a pipe that could fill up). Every wait here has a deadline, and a child that
dies while starting raises with the tail of its log.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the usual race applies)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class ChildProcess:
    """A started child with its log file; `stop()` is safe to call twice."""

    def __init__(self, argv: Sequence[str], env: dict[str, str] | None = None) -> None:
        self.argv = list(argv)
        fd, name = tempfile.mkstemp(prefix="pd-serve-child-", suffix=".log")
        self.log_path = Path(name)
        with os.fdopen(fd, "wb") as log_file:
            self.popen = subprocess.Popen(
                self.argv,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_text(self) -> str:
        """What the child has printed so far ("" once stop() has removed the log)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_ready(self, probe: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{what} exited with {self.popen.returncode}:\n{self.log_text()[-3000:]}")
            if probe():
                return
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"{what} not ready within {timeout}s:\n{self.log_text()[-3000:]}")

    def stop(self, graceful: bool = True, timeout: float = 5.0) -> None:
        """SIGTERM the process group (SIGKILL at once when not graceful, or after `timeout`)."""
        if self.popen.poll() is None:
            self._signal(signal.SIGTERM if graceful else signal.SIGKILL)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.popen.wait(timeout)
        self._signal(signal.SIGKILL)  # leftovers of the group (Granian's worker), if any
        self.log_path.unlink(missing_ok=True)

    def _signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):  # the group is already gone
            os.killpg(self.popen.pid, sig)


class BootstrapProcess(ChildProcess):
    """`python -m pd_serve.cli bootstrap` (the `pd-serve bootstrap` command) on host:port."""

    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        ready_timeout: float = 30.0,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        argv = [
            sys.executable,
            "-m",
            "pd_serve.cli",
            "bootstrap",
            "--host",
            host,
            "--port",
            str(self.port),
            *args,
        ]
        super().__init__(argv, env=env)
        self.wait_ready(self._healthy, ready_timeout, f"bootstrap on {self.url}")

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200
        except httpx.TransportError:
            return False


class RedisProcess(ChildProcess):
    """A throwaway redis-server on loopback: no persistence, killed on stop()."""

    def __init__(self, port: int | None = None, ready_timeout: float = 15.0) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server is not installed (apt-get install redis-server)")
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        super().__init__(argv)
        self.wait_ready(self._pong, ready_timeout, f"redis-server on port {self.port}")

    def _pong(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False
