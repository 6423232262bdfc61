"""`--drain-timeout`: on SIGTERM a node takes no new work (503 "draining", /health 503, it leaves the
bootstrap registry), lets what is in flight finish for at most that long, aborts the rest, and exits
0 by itself; a second SIGTERM aborts at once. `--drain-timeout 0` (abort at once) is
test_server_tls_shutdown.py's case; the drain's bookkeeping (early end, counts) is
tests/unit/test_server_drain.py's.

A colocated node and a decode node registered in a bootstrap service (it serves plain requests
alone), started at once. While a node drains its listener stays open, so a new request is answered
(503), not refused; the listener closes only once the drain is over. The frontend's part (it retries
a node's 503 on another pair, and pairs only registered nodes) has tests of its own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from pd_cluster import RoleProcess
from server_helpers import NodeProcess, sse_events, wait_until

from pd_serve.bootstrap.process import BootstrapProcess, ChildProcess
from pd_serve.cli import main

SHORT_TOKENS = 30  # finishes within the drain
LONG_TOKENS = 1900  # seconds of work even on a fast machine (the demo model's context is 2048)
EXIT_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def nodes() -> Iterator[dict[str, Any]]:
    bootstrap = BootstrapProcess()
    decode_args = ["--drain-timeout", "600", "--max-total-tokens", "4096"]
    started: dict[str, Any] = {"bootstrap": bootstrap}
    try:
        with ThreadPoolExecutor(2) as pool:
            timed = pool.submit(NodeProcess, ["--max-total-tokens", "4096", "--drain-timeout", "1"])
            decode = pool.submit(RoleProcess, "decode", bootstrap.url, decode_args)
            started["timed"], started["decode"] = timed.result(), decode.result()
        yield started
    finally:
        for child in started.values():
            child.stop()


class Stream(threading.Thread):
    """One streamed completion read to its end; `started` once its first event arrived."""

    def __init__(self, node: ChildProcess, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.url = f"{node.url}/v1/completions"
        self.body = {"model": "demo", "prompt": "the frontend", "max_tokens": max_tokens, "ignore_eos": True,
                     "stream": True, "stream_options": {"include_usage": True}}
        self.started = threading.Event()
        self.events: list[Any] = []
        self.start()

    def run(self) -> None:
        with httpx.stream("POST", self.url, json=self.body, timeout=120) as r:
            lines = []
            for line in r.iter_lines():
                lines.append(line)
                if line.startswith("data: "):
                    self.started.set()
        self.events = sse_events(lines)

    def finish(self) -> tuple[str, int]:
        """(finish_reason, completion tokens) once the stream has ended with [DONE]."""
        self.join(EXIT_TIMEOUT_S)
        assert not self.is_alive(), "the stream did not end"
        assert self.events[-1] == "[DONE]"
        reasons = [c["finish_reason"] for e in self.events[:-1] for c in e["choices"] if c["finish_reason"]]
        usage = self.events[-2]["usage"]
        return reasons[-1], usage["completion_tokens"]


def _draining(node: ChildProcess) -> bool:
    return httpx.get(f"{node.url}/health", timeout=10).status_code == 503


def _exit_code(node: ChildProcess) -> int:
    try:
        return node.popen.wait(EXIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the node did not exit within {EXIT_TIMEOUT_S} s; its log:\n{node.log_text()[-3000:]}")


def _registered(bootstrap: BootstrapProcess) -> list[str]:
    return [n["node_id"] for n in httpx.get(f"{bootstrap.url}/v1/nodes", timeout=10).json()["nodes"]]


def test_drain_refuses_new_work_finishes_streams_and_a_second_sigterm_aborts(nodes: dict[str, Any]) -> None:
    node, bootstrap = nodes["decode"], nodes["bootstrap"]  # --drain-timeout 600: only a second signal ends it
    assert node.node_id in _registered(bootstrap)
    short, long = Stream(node, SHORT_TOKENS), Stream(node, LONG_TOKENS)  # no `pd`: served here alone
    assert short.started.wait(60) and long.started.wait(60), "the streams never started"
    os.kill(node.pid, signal.SIGTERM)  # the supervisor only, as Kubernetes does
    wait_until(lambda: _draining(node), 30, "/health answers 503 once the node drains")
    health = httpx.get(f"{node.url}/health", timeout=10)
    assert health.json() == {"status": "draining"} and health.headers["retry-after"] == "1"
    refused = httpx.post(f"{node.url}/v1/completions", json={"model": "demo", "prompt": "hi", "max_tokens": 2},
                         timeout=30)  # answered on the open listener, not refused
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "draining" and "draining" in refused.json()["error"]["message"]
    assert "pd_node_draining 1.0" in httpx.get(f"{node.url}/metrics", timeout=10).text
    wait_until(lambda: node.node_id not in _registered(bootstrap), 30, "the node leaves the registry")
    assert short.finish() == ("length", SHORT_TOKENS)  # ran to completion during the drain
    assert long.is_alive()  # still draining, not aborted
    os.kill(node.pid, signal.SIGTERM)
    reason, tokens = long.finish()
    assert reason == "abort" and tokens < LONG_TOKENS
    assert _exit_code(node) == 0
    with pytest.raises(httpx.ConnectError):  # the listener is closed once the node has stopped
        httpx.get(f"{node.url}/health", timeout=10)


def test_drain_aborts_what_is_left_at_the_timeout_and_exits(nodes: dict[str, Any]) -> None:
    node = nodes["timed"]  # --drain-timeout 1
    long = Stream(node, LONG_TOKENS)
    assert long.started.wait(60), "the stream never started"
    os.kill(node.pid, signal.SIGTERM)
    reason, tokens = long.finish()
    assert reason == "abort" and 0 < tokens < LONG_TOKENS
    assert _exit_code(node) == 0  # by itself, no second signal


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_drain_timeout_is_validated(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["colocated", "--drain-timeout", value, "--print-config"]) == 2
    assert "drain_timeout (--drain-timeout)" in capsys.readouterr().err
