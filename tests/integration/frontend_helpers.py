"""Helpers for the frontend tests: a `pd-serve frontend` child process, metric parsing, process trees.

Not a conftest (that file belongs to everyone); test modules import it by name. The nodes behind a
frontend are real `pd-serve prefill`/`decode` processes (`pd_cluster.RoleProcess`); nothing here
stands in for one of our components. Every wait has a deadline. Waits and /proc checks
(`wait_until`, `pid_alive`) are in `server_helpers`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from pd_serve.bootstrap.process import ChildProcess, free_port

START_TIMEOUT = 120.0


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2.0, verify=False).status_code == 200
    except httpx.TransportError:
        return False


class FrontendProcess(ChildProcess):
    """`python -m pd_serve.cli frontend` on a free loopback port.

    `wait()` waits for /health == 200 (`wait_healthy`), or only for the port to answer; the
    constructor calls it unless `wait=False` (to start a frontend beside the nodes it will serve).
    """

    def __init__(
        self,
        args: Sequence[str],
        wait_healthy: bool = True,
        cert: tuple[Path, Path] | None = None,
        wait: bool = True,
    ) -> None:
        self.wait_healthy = wait_healthy
        self.port = free_port()
        self.scheme = "https" if cert else "http"
        self.url = f"{self.scheme}://127.0.0.1:{self.port}"
        argv = [
            sys.executable,
            "-m",
            "pd_serve.cli",
            "frontend",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-level",
            "info",
            *args,
        ]
        if cert:
            argv += ["--ssl-certfile", str(cert[0]), "--ssl-keyfile", str(cert[1])]
        super().__init__(argv, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if wait:
            self.wait()

    def wait(self) -> None:
        probe = (lambda: _healthy(self.url)) if self.wait_healthy else self._listening
        self.wait_ready(probe, START_TIMEOUT, f"pd-serve frontend on {self.url}")

    def _listening(self) -> bool:
        try:
            httpx.get(f"{self.url}/health", timeout=2.0, verify=False)
            return True
        except httpx.TransportError:
            return False

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=10, verify=False).text

    def nodes(self, key: str | None = None) -> list[dict[str, Any]]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.get(f"{self.url}/nodes", headers=headers, timeout=10, verify=False).json()["nodes"]


def metric_value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels` (0 when none)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc), children first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        out.append(child)
        todo.extend(children.get(child, []))
    return out
