"""A disaggregated cluster for tests: `pd-serve bootstrap`, `pd-serve prefill`, `pd-serve decode` processes.

Not a conftest (that file belongs to everyone); test modules import it by name. Requests are sent
as the frontend sends them: the same body with a `pd` object to both nodes at once.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
from collections.abc import Sequence
from typing import Any

import httpx

from pd_serve.bootstrap.process import BootstrapProcess, ChildProcess, free_port

START_TIMEOUT = 240.0


class RoleProcess(ChildProcess):
    def __init__(
        self, role: str, bootstrap_url: str | None, args: Sequence[str] = (), wait: bool = True,
        node_id: str | None = None,
    ) -> None:
        self.role = role
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.node_id = node_id or f"{role}-{self.port}"
        argv = [sys.executable, "-m", "pd_serve.cli", role, "--model", "demo", "--host", "127.0.0.1",
                "--port", str(self.port), "--node-id", self.node_id, "--log-level", "warning", *args]
        if bootstrap_url:
            argv += ["--bootstrap", bootstrap_url]
        super().__init__(argv, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if wait:
            self.wait()

    def wait(self) -> None:
        self.wait_ready(self._healthy, START_TIMEOUT, f"pd-serve {self.role} on {self.url}")

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200
        except httpx.TransportError:
            return False

    def server_info(self) -> dict[str, Any]:
        r = httpx.get(f"{self.url}/server_info", timeout=10.0)
        r.raise_for_status()
        info: dict[str, Any] = r.json()
        return info


class Cluster:
    def __init__(self, node_args: Sequence[str] = ()) -> None:
        self.bootstrap = BootstrapProcess(args=["--node-ttl", "5"])
        self.children: list[ChildProcess] = [self.bootstrap]
        try:  # both nodes start at once
            self.prefill = RoleProcess("prefill", self.bootstrap.url, node_args, wait=False)
            self.children.append(self.prefill)
            self.decode = RoleProcess("decode", self.bootstrap.url, node_args, wait=False)
            self.children.append(self.decode)
            self.prefill.wait()
            self.decode.wait()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()


async def pd_request(
    client: httpx.AsyncClient, prefill_url: str, decode_url: str, path: str, body: dict[str, Any],
    prefill_id: str, decode_id: str,
) -> tuple[httpx.Response, httpx.Response]:
    """Send `body` with a fresh room to both nodes at once, as the frontend does (not streamed)."""
    pd = {"room": secrets.randbits(63), "prefill": prefill_id, "decode": decode_id}
    full = {**body, "pd": pd}
    p, d = await asyncio.gather(
        client.post(prefill_url + path, json=full), client.post(decode_url + path, json=full)
    )
    return p, d
