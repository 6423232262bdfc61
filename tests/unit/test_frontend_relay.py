"""The relay's retry rule, cancellation and load guards, against mocked nodes (httpx.MockTransport)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

from pd_serve.frontend.config import FrontendConfig
from pd_serve.frontend.limits import prompt_text
from pd_serve.frontend.metrics import FrontendMetrics
from pd_serve.frontend.nodes import Node, NodeSet, layout_key
from pd_serve.frontend.proxy import Relay
from pd_serve.frontend.router import Router

LAYOUT = layout_key({"architecture": "Llama", "num_layers": 2, "num_kv_heads": 2, "head_dim": 8, "page_size": 16,
                     "dtype": "float32", "config_hash": "abc"})
OK_JSON = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}]}
Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]


def _event(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


class Harness:
    def __init__(self, handler: Handler, prefills: int = 2, decodes: int = 2, **kw: Any) -> None:
        self.config = FrontendConfig(bootstrap="http://b:1", **kw)
        self.nodes = NodeSet(self.config)
        self.nodes.replace_all(
            [Node(f"p{i}", "prefill", f"http://p{i}", LAYOUT, 1) for i in range(prefills)]
            + [Node(f"d{i}", "decode", f"http://d{i}", LAYOUT, 1) for i in range(decodes)]
        )
        self.metrics = FrontendMetrics()
        self.http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        self.relay = Relay(self.config, self.nodes, Router(self.config, self.nodes), self.http, self.metrics)
        self.sent: list[dict[str, Any]] = []

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    async def run(self, body: dict[str, Any]) -> tuple[int, bytes, dict[bytes, bytes]]:
        await self.relay.serve("/v1/chat/completions", body, json.dumps(body).encode(), self.send)
        await self.http.aclose()
        start = next(m for m in self.sent if m["type"] == "http.response.start")
        data = b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")
        return start["status"], data, dict(start["headers"])

    def retries(self) -> float:
        return sum(
            s.value for m in self.metrics.retries.collect() for s in m.samples if s.name.endswith("_total")
        )

    def assert_no_load(self) -> None:
        assert self.nodes.load.snapshot() == {}


BODY = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}


def _node(request: httpx.Request) -> str:
    return request.url.host


def test_prompt_text_reads_chat_and_completions() -> None:
    assert (
        prompt_text(
            {"messages": [{"role": "user", "content": "a"}, {"content": [{"type": "text", "text": "b"}]}]}
        )
        == "a\nb"
    )
    assert prompt_text({"prompt": "xyz"}) == "xyz"
    assert prompt_text({"prompt": [[1, 2]]}) == "1 2"


def test_both_nodes_get_the_same_body_with_pd_and_the_decode_answer_is_relayed() -> None:
    seen: dict[str, dict[str, Any]] = {}

    async def handler(request: httpx.Request) -> httpx.Response:
        seen[_node(request)] = json.loads(request.content)
        if _node(request).startswith("p"):
            return httpx.Response(200, json={"room": seen[_node(request)]["pd"]["room"], "prompt_tokens": 3})
        return httpx.Response(200, json=OK_JSON)

    h = Harness(handler, prefills=1, decodes=1)
    status, data, headers = asyncio.run(h.run(BODY))
    assert status == 200 and json.loads(data) == OK_JSON
    assert seen["p0"] == seen["d0"]
    pd = seen["d0"]["pd"]
    assert pd["prefill"] == "p0" and pd["decode"] == "d0" and 0 <= pd["room"] < 2**63
    assert "prefill_url" not in pd  # only in static mode
    assert headers[b"x-pd-prefill"] == b"p0"
    h.assert_no_load()


def test_decode_unreachable_is_retried_on_another_pair_with_a_new_room() -> None:
    rooms: list[int] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if _node(request) == "d0":
            rooms.append(body["pd"]["room"])
            raise httpx.ConnectError("refused")
        if _node(request).startswith("p"):
            await asyncio.sleep(0.01)
            return httpx.Response(200, json={"room": body["pd"]["room"]})
        rooms.append(body["pd"]["room"])
        return httpx.Response(200, json=OK_JSON)

    h = Harness(handler, policy="round_robin")
    status, _, headers = asyncio.run(h.run(BODY))
    assert status == 200 and headers[b"x-pd-decode"] == b"d1" and headers[b"x-pd-attempts"] == b"2"
    assert len(set(rooms)) == 2 and h.retries() == 1
    assert h.nodes.breaker("d0").consecutive_failures == 1
    h.assert_no_load()


def test_prefill_failure_cancels_the_waiting_decode_request_and_retries() -> None:
    cancelled: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        node = _node(request)
        if node == "p0":
            return httpx.Response(500, json={"error": {"message": "prefill broke"}})
        if node == "d0":  # waits for KV that never comes
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.append(node)
                raise
        return httpx.Response(200, json={"room": 1} if node.startswith("p") else OK_JSON)

    h = Harness(handler)
    status, _, headers = asyncio.run(h.run(BODY))
    assert status == 200 and headers[b"x-pd-prefill"] == b"p1"
    assert cancelled == ["d0"] and h.nodes.breaker("p0").consecutive_failures == 1
    h.assert_no_load()


@pytest.mark.parametrize("stream", [False, True])
def test_a_decode_node_unable_to_reach_the_prefill_node_blames_the_prefill_node(stream: bool) -> None:
    """The chaos run's case: d1 is dead and p0 restarted (the decode nodes' records of it are stale).
    D's refusal with code prefill_unreachable is p0's fault: the retry keeps d0 and drops p0, where
    blaming d0 left no pair and the client got the error."""
    refusal = {"error": {"message": "prefill node 'p0': cannot connect to tcp://p0:1", "code": "prefill_unreachable"}}

    async def events() -> AsyncIterator[bytes]:
        yield _event(refusal)

    async def handler(request: httpx.Request) -> httpx.Response:
        node, body = _node(request), json.loads(request.content)
        if node == "d1":
            raise httpx.ConnectError("refused")
        if node.startswith("p"):
            await asyncio.sleep(0.5 if node == "p0" else 0.01)  # p0 waits for a receiver that never comes
            return httpx.Response(200, json={"room": body["pd"]["room"]})
        if body["pd"]["prefill"] == "p0":
            if stream:
                return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=events())
            return httpx.Response(503, json=refusal)
        return httpx.Response(200, json=OK_JSON)

    for _ in range(4):  # whichever pair round-robin starts with
        h = Harness(handler, policy="round_robin")
        status, data, headers = asyncio.run(h.run({**BODY, "stream": stream} if stream else BODY))
        assert status == 200, data
        assert headers[b"x-pd-prefill"] == b"p1" and headers[b"x-pd-decode"] == b"d0"
        assert h.nodes.breaker("d0").consecutive_failures == 0
        h.assert_no_load()
    assert h.nodes.breaker("p0").consecutive_failures <= 1


def test_client_errors_are_relayed_not_retried() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        if _node(request).startswith("d"):
            return httpx.Response(
                400, json={"error": {"message": "max_tokens too big", "param": "max_tokens"}}
            )
        return httpx.Response(200, json={"room": 1})

    h = Harness(handler)
    status, data, _ = asyncio.run(h.run(BODY))
    assert status == 400 and json.loads(data)["error"]["param"] == "max_tokens"
    assert h.retries() == 0 and h.nodes.breaker("d0").consecutive_failures == 0
    h.assert_no_load()


def test_a_stream_opening_with_an_error_event_is_retried() -> None:
    async def stream(first: bytes) -> AsyncIterator[bytes]:
        yield first
        yield _event({"choices": [{"delta": {"content": "b"}}]}) + b"data: [DONE]\n\n"

    async def handler(request: httpx.Request) -> httpx.Response:
        node = _node(request)
        if node.startswith("p"):
            return httpx.Response(200, json={"room": 1})
        first = (
            _event({"error": {"message": "room failed"}})
            if node == "d0"
            else _event({"choices": [{"delta": {"content": "a"}}]})
        )
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=stream(first))

    h = Harness(handler)
    status, data, _ = asyncio.run(h.run({**BODY, "stream": True}))
    assert status == 200 and b"room failed" not in data and data.endswith(b"data: [DONE]\n\n")
    assert h.retries() == 1
    h.assert_no_load()


def test_a_stream_broken_after_the_first_byte_is_not_retried() -> None:
    calls: list[str] = []

    async def stream() -> AsyncIterator[bytes]:
        yield _event({"choices": [{"delta": {"content": "a"}}]})
        raise httpx.ReadError("decode node died")

    async def handler(request: httpx.Request) -> httpx.Response:
        calls.append(_node(request))
        if _node(request).startswith("p"):
            return httpx.Response(200, json={"room": 1})
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=stream())

    h = Harness(handler)
    status, data, _ = asyncio.run(h.run({**BODY, "stream": True}))
    assert status == 200 and b'"content": "a"' in data and b"decode_stream_broken" in data
    assert sorted(calls) == ["d0", "p0"] and h.retries() == 0
    h.assert_no_load()


def test_retries_are_bounded_and_the_last_error_is_relayed() -> None:
    calls: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        calls.append(_node(request))
        if _node(request).startswith("p"):
            return httpx.Response(200, json={"room": 1})
        return httpx.Response(503, json={"error": {"message": "full", "code": "queue_full"}})

    h = Harness(handler, prefills=1, decodes=4, max_retries=2)
    status, data, _ = asyncio.run(h.run(BODY))
    assert status == 503 and json.loads(data)["error"]["code"] == "queue_full"
    assert len([c for c in calls if c.startswith("d")]) == 3 and h.retries() == 2
    assert all(h.nodes.breaker(f"d{i}").consecutive_failures == 0 for i in range(4))  # busy is not broken
    h.assert_no_load()


def test_no_pair_is_a_503_with_retry_after() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        raise AssertionError("no node should be called")

    h = Harness(handler, prefills=1, decodes=0)
    status, data, headers = asyncio.run(h.run(BODY))
    assert (
        status == 503 and headers[b"retry-after"] == b"1" and json.loads(data)["error"]["code"] == "no_pair"
    )


def test_client_disconnect_cancels_both_upstream_requests_and_releases_load() -> None:
    cancelled: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(_node(request))
            raise
        raise AssertionError("unreachable")

    async def scenario() -> Harness:
        h = Harness(handler, prefills=1, decodes=1)
        task = asyncio.create_task(
            h.relay.serve("/v1/chat/completions", BODY, json.dumps(BODY).encode(), h.send)
        )
        await asyncio.sleep(0.05)
        assert h.nodes.load.snapshot() == {"p0": 1, "d0": 1}
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.01)
        return h

    h = asyncio.run(scenario())
    assert sorted(cancelled) == ["d0", "p0"] and h.sent == []
    h.assert_no_load()
    assert h.nodes.breaker("p0").available() and h.nodes.breaker("d0").consecutive_failures == 0
