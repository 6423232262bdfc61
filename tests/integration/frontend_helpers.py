"""Helpers for the frontend tests: fake prefill/decode nodes, a frontend child process, waits.

A fake node speaks the node contract of `pd_serve/frontend/proxy.py` without a model, so the
frontend's pairing, retries, breakers and cancellation are tested in seconds:
- prefill: answers a `pd` request with `{"room", "prompt_tokens", "timings"}` after `--prefill-delay`
  and marks the room done; `GET /fake/rooms/{room}` waits (10 s at most) until the room is done.
- decode: for a `pd` request, waits for the room at its prefill peer (`pd.prefill_url`, else the
  peer's `http_url` from bootstrap); if that fails it answers 503 like a decode node whose room
  failed. Then it streams (or returns) a deterministic OpenAI answer made from the prompt.
- `GET /fake/stats`: pd/solo requests seen, streams closed early by the client, prefills cancelled.
Run as `python frontend_helpers.py --role decode --port P [--bootstrap URL] ...` (Granian, one worker).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from pd_serve.bootstrap.process import ChildProcess, free_port

HERE = Path(__file__).resolve().parent
START_TIMEOUT = 120.0


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2.0, verify=False).status_code == 200
    except httpx.TransportError:
        return False


class FakeNodeProcess(ChildProcess):
    def __init__(
        self, role: str, node_id: str, bootstrap: str | None = None, args: Sequence[str] = ()
    ) -> None:
        self.role, self.node_id = role, node_id
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [
            sys.executable,
            str(HERE / "frontend_helpers.py"),
            "--role",
            role,
            "--node-id",
            node_id,
            "--port",
            str(self.port),
            *(["--bootstrap", bootstrap] if bootstrap else []),
            *args,
        ]
        super().__init__(argv, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.wait_ready(lambda: _healthy(self.url), START_TIMEOUT, f"fake {role} node {node_id}")

    def stats(self) -> dict[str, int]:
        return httpx.get(f"{self.url}/fake/stats", timeout=10).json()


class FrontendProcess(ChildProcess):
    """`python -m pd_serve.cli frontend` on a free loopback port; waits for /health == 200 if asked."""

    def __init__(
        self, args: Sequence[str], wait_healthy: bool = True, cert: tuple[Path, Path] | None = None
    ) -> None:
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
        probe = (lambda: _healthy(self.url)) if wait_healthy else self._listening
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


def wait_until(check: Any, timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout} s")


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


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def expected_words(prompt: str, n: int) -> list[str]:
    """What a fake node answers for this prompt: n words drawn from its hash."""
    seed = hashlib.sha256(prompt.encode()).digest()
    return [f"w{seed[i % len(seed)] + i}" for i in range(n)]


# ---- the fake node (runs in its own process) ---------------------------------------------------------
def _prompt(body: dict[str, Any]) -> str:
    if "messages" in body:
        return "\n".join(str(m.get("content", "")) for m in body["messages"])
    return str(body.get("prompt", ""))


def build_fake_node(opts: argparse.Namespace) -> Any:
    rooms: dict[int, asyncio.Event] = {}
    stats = {
        "pd_requests": 0,
        "solo_requests": 0,
        "streams_closed_early": 0,
        "prefills_cancelled": 0,
        "prefills_done": 0,
    }
    layout = {
        "architecture": "Fake",
        "num_layers": 2,
        "num_kv_heads": 2,
        "head_dim": 16,
        "dtype": "float32",
        "page_size": opts.page_size,
        "config_hash": "fake",
    }
    state: dict[str, Any] = {}

    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state["http"] = httpx.AsyncClient(timeout=15.0)
        keeper = None
        if opts.bootstrap:
            from pd_serve.bootstrap.client import BootstrapClient, NodeKeeper
            from pd_serve.bootstrap.records import NodeRegistration

            client = BootstrapClient(opts.bootstrap)
            state["bootstrap"] = client
            transfer = (
                [] if opts.role == "colocated" else [{"backend": "fake", "address": f"127.0.0.1:{opts.port}"}]
            )
            reg = NodeRegistration.model_validate(
                {
                    "role": opts.role,
                    "http_url": f"http://127.0.0.1:{opts.port}",
                    "transfer": transfer,
                    "layout": layout,
                    "capacity": {"total_pages": 100, "max_running_requests": 8},
                },
                strict=False,
            )
            keeper = NodeKeeper(client, opts.node_id, reg)
            await keeper.start()
        yield
        if keeper is not None:
            await keeper.stop(leave=False)
        await state["http"].aclose()

    from contextlib import asynccontextmanager

    app = FastAPI(lifespan=asynccontextmanager(lifespan))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/server_info")
    async def server_info() -> dict[str, Any]:
        return {"role": opts.role, "layout": layout, "transfer_endpoint": f"fake://127.0.0.1:{opts.port}"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "demo", "object": "model", "owned_by": opts.node_id}]}

    @app.post("/flush_cache")
    async def flush() -> dict[str, int]:
        return {"freed_pages": 0}

    @app.get("/fake/stats")
    async def get_stats() -> dict[str, int]:
        return stats

    @app.get("/fake/rooms/{room}")
    async def wait_room(room: int) -> JSONResponse:
        event = rooms.setdefault(room, asyncio.Event())
        try:
            await asyncio.wait_for(event.wait(), 10.0)
        except asyncio.TimeoutError:
            return JSONResponse({"error": {"message": "room timed out"}}, status_code=404)
        return JSONResponse({"room": room, "done": True})

    async def generate(request: Request) -> Any:
        body = await request.json()
        pd = body.get("pd")
        stats["pd_requests" if pd else "solo_requests"] += 1
        if pd and opts.role == "prefill":
            return await _prefill(body, pd)
        if pd:
            failure = await _await_room(pd)
            if failure:
                err = {
                    "error": {
                        "message": f"prefill failed the room: {failure}",
                        "type": "service_unavailable",
                        "param": None,
                        "code": "room_failed",
                    }
                }
                return JSONResponse(err, status_code=503)
        words = expected_words(_prompt(body), int(body.get("max_tokens") or 8))
        chat = "messages" in body
        if body.get("stream"):
            return StreamingResponse(_stream(words, chat), media_type="text/event-stream")
        text = " ".join(words)
        choice = {
            "index": 0,
            "finish_reason": "length",
            **({"message": {"role": "assistant", "content": text}} if chat else {"text": text}),
        }
        return JSONResponse(
            {
                "id": "fake-1",
                "object": "chat.completion" if chat else "text_completion",
                "created": 0,
                "model": "demo",
                "choices": [choice],
                "usage": {
                    "prompt_tokens": 1,
                    "completion_tokens": len(words),
                    "total_tokens": 1 + len(words),
                },
            }
        )

    async def _prefill(body: dict[str, Any], pd: dict[str, Any]) -> JSONResponse:
        try:
            await asyncio.sleep(opts.prefill_delay)
        except asyncio.CancelledError:
            stats["prefills_cancelled"] += 1
            raise
        rooms.setdefault(pd["room"], asyncio.Event()).set()
        stats["prefills_done"] += 1
        return JSONResponse({"room": pd["room"], "prompt_tokens": len(_prompt(body)), "timings": {}})

    async def _await_room(pd: dict[str, Any]) -> str | None:
        url = pd.get("prefill_url")
        try:
            if url is None:
                from pd_serve.bootstrap.client import BootstrapError

                try:
                    record = await state["bootstrap"].get_node(pd["prefill"])
                except BootstrapError as exc:
                    return str(exc)
                if record is None:
                    return f"prefill node {pd['prefill']} unknown"
                url = record.http_url
            r = await state["http"].get(f"{url}/fake/rooms/{pd['room']}")
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}"
        return None if r.status_code == 200 else f"room status {r.status_code}"

    async def _stream(words: list[str], chat: bool) -> AsyncIterator[bytes]:
        import json

        done = False
        try:
            for i, word in enumerate(words):
                text = word if i == 0 else " " + word
                delta = {"delta": {"content": text}} if chat else {"text": text}
                chunk = {
                    "id": "fake-1",
                    "object": "chat.completion.chunk" if chat else "text_completion",
                    "created": 0,
                    "model": "demo",
                    "choices": [{"index": 0, "finish_reason": None, **delta}],
                }
                yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
                await asyncio.sleep(opts.token_delay)
            yield b"data: [DONE]\n\n"
            done = True
        finally:
            if not done:
                stats["streams_closed_early"] += 1

    app.add_api_route("/v1/chat/completions", generate, methods=["POST"])
    app.add_api_route("/v1/completions", generate, methods=["POST"])
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--role", required=True, choices=("prefill", "decode", "colocated"))
    parser.add_argument("--node-id", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bootstrap", default=None)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--prefill-delay", type=float, default=0.0)
    parser.add_argument("--token-delay", type=float, default=0.0)
    opts = parser.parse_args()
    from functools import partial

    from granian import Granian
    from granian.constants import Interfaces

    server = Granian(
        "frontend_helpers:build_fake_node",
        address="127.0.0.1",
        port=opts.port,
        interface=Interfaces.ASGI,
        workers=1,
        log_access=False,
    )
    server.serve(target_loader=partial(build_fake_node, opts), wrap_loader=False)


if __name__ == "__main__":
    main()
