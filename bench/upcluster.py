"""A `pd-serve up` cluster driven from a script or a test: start it, find its children, fault them.

`UpCluster(args)` runs `python -m pd_serve.cli up --restart --log-dir DIR ARGS` (`restart=False`: no --restart) and waits for its
"ready at" line; `children()` reads `DIR/cluster.json` (written by `up` on every child start) for each
child's pid, URL and argv. `kill(name)` sends SIGKILL to the child's process group (API process,
Granian worker, engine); `up --restart` starts it again on the same port, and `wait_restarted`
waits for the new pid to be healthy. `signal(name, SIGSTOP/SIGCONT)` pauses and resumes a child.
`headers` carry the cluster token (bootstrap reads, nodes' internal routes). `stop()` sends SIGTERM to `up` (which stops every child), then SIGKILL to whatever is left.
Every wait has a deadline. Standard library only.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

READY_TIMEOUT_S = 300.0
STOP_GRACE_S = 10.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def wait_for(predicate: Any, timeout: float, what: str, poll: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(poll)


class UpCluster:
    def __init__(
        self,
        args: list[str],
        log_dir: str | None = None,
        ready_timeout: float = READY_TIMEOUT_S,
        env: dict[str, str] | None = None,
        restart: bool = True,
    ) -> None:
        self.port = free_port()
        # the cluster token every child gets from `up` (in its environment, never in argv)
        self.token = secrets.token_urlsafe(24)
        self.headers = {"Authorization": f"Bearer {self.token}", "X-PD-Cluster-Token": self.token}
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="pd-serve-chaos-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.out_path = self.log_dir / "up.out"
        argv = [
            sys.executable, "-m", "pd_serve.cli", "up", *(["--restart"] if restart else []), "--port", str(self.port),
            "--log-dir", str(self.log_dir), "--ready-timeout", str(ready_timeout), "--grace", "5", *args,
        ]  # fmt: skip
        with open(self.out_path, "ab") as out:
            self.popen = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={
                    **os.environ,
                    "PYTHONUNBUFFERED": "1",
                    "PD_SERVE_CLUSTER_TOKEN": self.token,
                    **(env or {}),
                },
                start_new_session=True,
            )
        try:
            wait_for(self._ready, ready_timeout + 30, f"pd-serve up ({self.out_path})", poll=0.5)
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        if self.popen.poll() is not None:
            raise RuntimeError(f"pd-serve up exited with {self.popen.returncode}:\n{self.output()[-4000:]}")
        return "ready at" in self.output()

    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    # ---- children -------------------------------------------------------------------------

    def children(self) -> dict[str, dict[str, Any]]:
        data = json.loads((self.log_dir / "cluster.json").read_text())
        return {c["name"]: c for c in data["children"]}

    def nodes(self) -> list[tuple[str, str]]:
        """(name, url) of every prefill/decode/colocated child."""
        return [(n, c["url"]) for n, c in self.children().items() if n not in ("bootstrap", "frontend")]

    def pid(self, name: str) -> int:
        return int(self.children()[name]["pid"])

    def url_of(self, name: str) -> str:
        return str(self.children()[name]["url"])

    def signal(self, name: str, sig: signal.Signals) -> int:
        """Send `sig` to the child's whole process group; returns the pid it went to."""
        pid = self.pid(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)
        return pid

    def kill(self, name: str) -> int:
        return self.signal(name, signal.SIGKILL)

    def wait_restarted(self, name: str, old_pid: int, timeout: float = READY_TIMEOUT_S) -> None:
        """Until `up` has started `name` again (a new pid) and it answers /health with 200."""
        wait_for(lambda: self.pid(name) != old_pid, 30.0, f"up restarting {name}")
        url = self.url_of(name)
        wait_for(lambda: healthy(url), timeout, f"{name} healthy again at {url}", poll=0.3)

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # ---- stop -------------------------------------------------------------------------------

    def stop(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(STOP_GRACE_S + 10)
        with contextlib.suppress(FileNotFoundError, ValueError, KeyError):
            for child in self.children().values():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(int(child["pid"]), signal.SIGCONT)  # a stopped child cannot die of SIGTERM
                    os.killpg(int(child["pid"]), signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)

    def __enter__(self) -> UpCluster:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
