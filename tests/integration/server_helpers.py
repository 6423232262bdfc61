"""Helpers for the node server tests: a `pd-serve colocated` child process, SSE parsing, waits.

Not a conftest (that file belongs to everyone); test modules import it by name.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import httpx

from pd_serve.bootstrap.process import ChildProcess, free_port

START_TIMEOUT = 240.0  # loading torch and transformers on a busy 2-core machine


class NodeProcess(ChildProcess):
    """`python -m pd_serve.cli colocated --model demo` on a free loopback port."""

    def __init__(self, args: Sequence[str] = (), cert: tuple[Path, Path] | None = None) -> None:
        self.port = free_port()
        self.scheme = "https" if cert else "http"
        self.url = f"{self.scheme}://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "pd_serve.cli", "colocated", "--model", "demo", "--host", "127.0.0.1",
                "--port", str(self.port), "--log-level", "warning", *args]
        if cert:
            argv += ["--ssl-certfile", str(cert[0]), "--ssl-keyfile", str(cert[1])]
        super().__init__(argv, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.wait_ready(self._healthy, START_TIMEOUT, f"pd-serve colocated on {self.url}")

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=2.0, verify=False).status_code == 200
        except httpx.TransportError:
            return False


def sse_events(lines: Iterable[str]) -> list[Any]:
    """Parsed `data:` payloads of an SSE stream; the final `[DONE]` kept as the string."""
    events: list[Any] = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def wait_until(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout} s")


def server_info(url: str) -> dict[str, Any]:
    r = httpx.get(f"{url}/server_info", timeout=10.0)
    r.raise_for_status()
    info: dict[str, Any] = r.json()
    return info


def assert_node_idle(url: str, timeout: float = 60.0) -> None:
    """The no-leak check on one node: every idle counter back at its idle value (free pages: all)."""

    def idle() -> bool:
        counters = server_info(url)["idle"]
        return counters["pages_free"] == counters["pages_total"] and not any(
            v for k, v in counters.items() if k not in ("pages_free", "pages_total")
        )

    wait_until(idle, timeout, f"{url} back to idle: {server_info(url)['idle']}", interval=0.2)


def pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def parent_pid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
