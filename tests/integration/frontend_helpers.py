"""Helpers for the frontend tests: `pd-serve up` and `pd-serve frontend` child processes, the openai
client's greedy text, metric parsing, process trees.

Not a conftest (that file belongs to everyone); test modules import it by name. The nodes behind a
frontend are real `pd-serve prefill`/`decode` processes started by `pd-serve up` (`UpProcess`);
nothing here stands in for one of our components. Every wait has a deadline. Waits and /proc checks
(`wait_until`, `pid_alive`) are in `server_helpers`.

The cluster token: `up` makes one for its children unless its environment has one. `UpProcess`
gives it one of its own (`cluster_env`) so that a frontend a test starts beside the cluster
(`FrontendProcess(env=up.env)`) may send pd requests to the cluster's nodes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import openai
from server_helpers import parent_pid

from pd_serve.bootstrap.process import ChildProcess, free_port

START_TIMEOUT = 120.0
UP_READY_TIMEOUT = 400.0
CLUSTER_TOKEN_ENV = "PD_SERVE_CLUSTER_TOKEN"  # read by every role; `up` passes its own on to its children


def cluster_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", CLUSTER_TOKEN_ENV: secrets.token_urlsafe(24)}


class UpProcess:
    """`python -m pd_serve.cli up --port P --api-key KEY ARGS...` in a session of its own.

    `wait_ready()` waits for its ready line; `stop()` SIGTERMs it (the test of a clean stop),
    `kill()` SIGKILLs its whole tree (cleanup, safe to call twice) and removes its logs.
    """

    def __init__(self, args: Sequence[str], api_key: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = cluster_env()
        self.log = Path(tempfile.mkstemp(prefix="pd-serve-up-test-", suffix=".log")[1])
        self.log_dir = tempfile.mkdtemp(prefix="pd-serve-up-test-logs-")
        argv = [
            sys.executable,
            "-m",
            "pd_serve.cli",
            "up",
            "--port",
            str(self.port),
            "--api-key",
            api_key,
            "--grace",
            "10",
            "--log-dir",
            self.log_dir,
            *args,
        ]
        with open(self.log, "wb") as out:
            self.popen = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
            )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + UP_READY_TIMEOUT
        while "ready at" not in self.output():
            if self.popen.poll() is not None or time.monotonic() > deadline:
                out = self.output()[-4000:] + "".join(
                    f"\n--- {p.name}:\n{p.read_text(errors='replace')[-1500:]}"
                    for p in Path(self.log_dir).glob("*.log")
                )
                self.kill()
                raise AssertionError(f"pd-serve up did not get ready:\n{out}")
            time.sleep(0.2)

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def child_pid(self, name: str) -> int:
        """The pid of the child `up` started as `name` (`prefill-0`, `frontend`...), from the
        cluster.json `up` writes in its log directory (exact, where matching argv would also match
        the " worker-1" process Granian starts under each node)."""
        data = json.loads((Path(self.log_dir) / "cluster.json").read_text())
        for child in data["children"]:
            if child["name"] == name and parent_pid(int(child["pid"])) == self.popen.pid:
                return int(child["pid"])
        raise AssertionError(f"no child {name} under pd-serve up ({self.popen.pid}): {data['children']}")

    def kill(self) -> None:
        for pid in descendants(self.popen.pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(10)
        self.log.unlink(missing_ok=True)
        shutil.rmtree(self.log_dir, ignore_errors=True)

    def ready_line_matches(self, layout: str) -> bool:
        return re.search(rf"ready at {re.escape(self.url)} \({re.escape(layout)}", self.output()) is not None


def greedy_chat(client: openai.OpenAI, content: str, stream: bool, max_tokens: int = 12) -> str:
    """The text of a greedy chat completion through the official client, streamed or not."""
    args: dict[str, Any] = dict(
        model="demo",
        messages=[{"role": "user", "content": content}],
        max_tokens=max_tokens,
        temperature=0.0,
        extra_body={"ignore_eos": True},
    )
    if not stream:
        return client.chat.completions.create(**args).choices[0].message.content or ""
    return "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(stream=True, **args)
        if c.choices
    )


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
        env: dict[str, str] | None = None,
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
        super().__init__(argv, env=env or {**os.environ, "PYTHONUNBUFFERED": "1"})
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
