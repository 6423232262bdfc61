"""Shared pieces of the fuzz tests: the processes under test, the properties every answer must have,
a raw HTTP/1.1 sender for what httpx will not send, and the fixed hypothesis settings.

Targets are real processes on 127.0.0.1 (a `pd-serve colocated` node with its engine, a
`pd-serve frontend` in front of it, a `pd-serve bootstrap`), reached over real HTTP. Nothing of ours
is mocked. Not a conftest (that file only wires fixtures); test modules import it by name.

Budget: the example counts below keep the whole directory near 60 s on a 2-core CI machine
(most of it is the node's start). `PD_SERVE_FUZZ_SCALE=20` multiplies every count for a long run;
the seed stays fixed (`derandomize=True`), and no example database is read or written.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from hypothesis import HealthCheck, settings

from pd_serve.bootstrap.process import ChildProcess, free_port

START_TIMEOUT = 240.0  # torch and transformers imports on a busy 2-core machine
MODEL = "demo"
MAX_MODEL_LEN = 64  # keeps the rare valid request without max_tokens (or with a big one) short
SCALE = max(1, int(os.environ.get("PD_SERVE_FUZZ_SCALE", "1")))
OPENAI_ERROR_KEYS = {"message", "type", "param", "code"}

_BASE = settings(
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


def fuzz_settings(examples: int) -> settings:
    """The fixed-seed settings with `examples` (times PD_SERVE_FUZZ_SCALE) examples."""
    return settings(_BASE, max_examples=examples * SCALE)


# ---- processes ------------------------------------------------------------------------------------
_PROBE = httpx.Client(timeout=2.0)  # one client for every readiness probe: a new one costs CPU each time


def _answers(url: str, path: str = "/health") -> bool:
    try:
        return _PROBE.get(f"{url}{path}").status_code == 200
    except httpx.TransportError:
        return False


class Service(ChildProcess):
    """`python -m pd_serve.cli <role> ...` on a free loopback port; `ready()` waits for /health 200."""

    def __init__(self, role: str, args: Sequence[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.role = role
        argv = [sys.executable, "-m", "pd_serve.cli", role, "--host", "127.0.0.1", "--port", str(self.port), *args]
        super().__init__(argv, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def ready(self, timeout: float = START_TIMEOUT) -> Service:
        """Wait for /health 200 (polled every 0.1 s, not faster: CI has two cores for everything)."""
        what = f"pd-serve {self.role} on {self.url}"
        deadline = time.monotonic() + timeout
        while not _answers(self.url):
            if self.popen.poll() is not None:
                raise RuntimeError(f"{what} exited with {self.popen.returncode}:\n{self.log_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} not ready within {timeout} s:\n{self.log_text()[-3000:]}")
            time.sleep(0.1)
        return self

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None


@dataclass(frozen=True)
class Stack:
    node: Service
    frontend: Service
    bootstrap: Service


def start_node() -> Service:
    return Service("colocated", [
        "--model", MODEL, "--log-level", "warning", "--max-model-len", str(MAX_MODEL_LEN),
        "--max-total-tokens", "4096", "--max-running-requests", "32", "--max-queued-requests", "256",
    ])


def start_frontend(node_url: str) -> Service:
    """Probes every 2 s, each allowed 4 s: a node slow to answer /health under load is not dropped."""
    return Service("frontend", ["--decode", node_url, "--log-level", "warning", "--probe-interval", "2"])


def start_bootstrap() -> Service:
    return Service("bootstrap", ["--log-level", "warning", "--max-nodes", "100000"])


# ---- properties -----------------------------------------------------------------------------------
def check_openai_answer(r: httpx.Response, field: str | None = None) -> dict[str, Any] | None:
    """No 5xx; a 4xx is `{"error": {message, type, param, code}}` naming `field` when one was broken.
    Returns the error object (None for a 2xx)."""
    assert r.status_code < 500, f"{r.status_code}: {r.text[:500]}"
    if r.status_code < 400:
        return None
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == OPENAI_ERROR_KEYS, err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    assert err["param"] is None or isinstance(err["param"], str), err
    assert err["code"] is None or isinstance(err["code"], str), err
    if field is not None and r.status_code == 400:
        named = err["param"] or ""
        assert named.split(".")[0].split("[")[0] == field or field in err["message"], (field, err)
    return err


def check_bootstrap_answer(r: httpx.Response, field: str | None = None) -> None:
    """Bootstrap's own documented error shape: no 5xx; a 4xx is `{"detail": str}`, and a 422 lists
    `errors: [{field, message}]` naming `field` when one was broken."""
    assert r.status_code < 500, f"{r.status_code}: {r.text[:500]}"
    if r.status_code < 400:
        return
    body = r.json()
    assert isinstance(body.get("detail"), str) and body["detail"], body
    if r.status_code == 422:
        errors = body["errors"]
        assert errors and all(isinstance(e["field"], str) and isinstance(e["message"], str) for e in errors), body
        if field is not None:
            assert any(e["field"] == field or e["field"].startswith(f"{field}.") for e in errors), (field, body)


def encode(body: Any) -> bytes:
    """JSON the way a careless client writes it: NaN and Infinity as bare words, lone surrogates escaped."""
    return json.dumps(body, allow_nan=True).encode()


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout} s")


def node_idle(http: httpx.Client) -> dict[str, int]:
    return http.get("/server_info").json()["idle"]


def is_idle(idle: dict[str, int]) -> bool:
    return idle["pages_free"] == idle["pages_total"] and all(
        v == 0 for k, v in idle.items() if k not in ("pages_free", "pages_total")
    )


def wait_node_idle(http: httpx.Client, timeout: float = 30.0) -> None:
    """The no-leak check: pages all free, no engine request, no slot, no stream, within `timeout`."""
    last: dict[str, int] = {}

    def idle() -> bool:
        nonlocal last
        last = node_idle(http)
        return is_idle(last)

    try:
        wait_until(idle, timeout, "node back to idle")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {last}") from None


def serves_normally(http: httpx.Client, path: str = "/v1/chat/completions") -> None:
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 2}
    if path.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": "still there?"}]
    else:
        body["prompt"] = "still there?"
    r = http.post(path, json=body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


# ---- raw HTTP/1.1 ---------------------------------------------------------------------------------
def raw_exchange(port: int, request: bytes, timeout: float = 30.0, close_early: bool = False) -> bytes:
    """Send bytes as they are; return what came back (b"" if the server closed without a word).
    `close_early`: hang up right after sending (a client that leaves mid-body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        if close_early:
            return b""
        chunks = []  # no half-close: servers take EOF for a client that left; requests say Connection: close
        while True:
            try:
                data = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks)


def raw_status(answer: bytes) -> int | None:
    """The status of a raw HTTP/1.1 answer, None when there was none."""
    if not answer.startswith(b"HTTP/1."):
        return None
    return int(answer.split(b" ", 2)[1])


def raw_body(answer: bytes) -> bytes:
    head, _, body = answer.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        out, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0] or b"0", 16)
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2:]
        return out
    return body
