"""`pd-serve up` end to end with the demo model: 1 prefill + 1 decode node behind the frontend.

The cluster is started once for the module (through the real command, as a user would), beside one
`pd-serve colocated` node whose greedy output the disaggregated path must equal. The last test
stops `up` with SIGTERM and checks that no process of its tree is left.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from frontend_helpers import descendants
from server_helpers import NodeProcess, pid_alive, wait_until

from pd_serve.bootstrap.process import free_port
from pd_serve.cli import SUBCOMMANDS

pytestmark = pytest.mark.skipif(
    "decode" not in SUBCOMMANDS, reason="pd-serve prefill/decode are not registered in pd_serve/cli.py yet"
)
KEY = "up-key"
READY_TIMEOUT = 400.0


class Up:
    def __init__(self, args: list[str]) -> None:
        self.port = free_port()
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
            KEY,
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
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                start_new_session=True,
            )
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while "ready at" not in self.output():
            if self.popen.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"pd-serve up did not get ready:\n{self.output()[-4000:]}")
            time.sleep(0.2)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        for pid in descendants(self.popen.pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(10)
        self.log.unlink(missing_ok=True)
        shutil.rmtree(self.log_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def both() -> Iterator[tuple[Up, NodeProcess]]:
    """The cluster and the colocated node, started side by side (each waits on torch imports)."""
    cluster = Up(["--num-prefill", "1", "--num-decode", "1", "--transfer-backend", "tcp"])
    try:
        node = NodeProcess()
    except BaseException:
        cluster.kill()
        raise
    try:
        cluster.wait_ready()
        yield cluster, node
    finally:
        node.stop()
        cluster.kill()


@pytest.fixture(scope="module")
def up(both: tuple[Up, NodeProcess]) -> Up:
    return both[0]


@pytest.fixture(scope="module")
def colocated(both: tuple[Up, NodeProcess]) -> NodeProcess:
    return both[1]


def _greedy(client: openai.OpenAI, content: str, stream: bool) -> str:
    args: dict[str, Any] = dict(
        model="demo",
        messages=[{"role": "user", "content": content}],
        max_tokens=12,
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


def test_up_prints_the_url_and_a_curl_example(up: Up) -> None:
    out = up.output()
    assert re.search(rf"ready at {re.escape(up.url)} \(1 prefill, 1 decode", out) and "curl " in out
    nodes = httpx.get(f"{up.url}/nodes", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()[
        "nodes"
    ]
    assert sorted(n["role"] for n in nodes) == ["decode", "prefill"]


@pytest.mark.parametrize("stream", [False, True])
def test_disaggregated_greedy_output_equals_colocated(up: Up, colocated: NodeProcess, stream: bool) -> None:
    through = openai.OpenAI(base_url=f"{up.url}/v1", api_key=KEY, max_retries=0, timeout=120)
    direct = openai.OpenAI(base_url=f"{colocated.url}/v1", api_key="none", max_retries=0, timeout=120)
    for content in ("the scheduler moves pages", "a longer prompt " * 12):
        assert _greedy(through, content, stream) == _greedy(direct, content, stream)


def test_http2_through_the_frontend(up: Up) -> None:
    body = {"model": "demo", "prompt": "hello", "max_tokens": 4, "stream": True}
    with httpx.Client(http1=False, http2=True, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
        r = c.post(f"{up.url}/v1/completions", json=body)
    assert r.status_code == 200 and r.http_version == "HTTP/2" and r.text.endswith("data: [DONE]\n\n")
    assert r.headers["x-pd-prefill"] == "prefill-0"


def test_sigterm_stops_every_child(up: Up) -> None:
    tree = descendants(up.popen.pid)
    assert len(tree) >= 4  # bootstrap, prefill, decode, frontend (and their workers and engines)
    up.popen.send_signal(signal.SIGTERM)
    assert up.popen.wait(60) == 0
    wait_until(lambda: not any(pid_alive(p) for p in tree), 30, "every process of the up tree exits")
