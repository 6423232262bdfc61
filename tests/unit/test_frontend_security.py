"""Frontend API keys and per-key limits, the cluster token's plumbing and the node's pd-plane guard,
driven in-process through their ASGI interfaces (nodes, where needed, are httpx.MockTransport)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from pd_serve.cluster_token import read_cluster_token
from pd_serve.frontend.app import FrontendApp
from pd_serve.frontend.cli import api_keys
from pd_serve.frontend.config import FrontendConfig
from pd_serve.frontend.limits import cap_output
from pd_serve.frontend.load import Admission
from pd_serve.http_common import KeyRing, Message, reply
from pd_serve.server.middleware import ClusterPlane

KEYS = ("key-alpha-0001", "key-beta-0002")
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}


class Call:
    """One ASGI request: `hold` keeps the body unfinished (and the request in flight) until it is set,
    then the client disconnects."""

    def __init__(self, app: Callable[..., Awaitable[None]], path: str, body: bytes = b"", key: str | None = None,
                 headers: dict[str, str] | None = None, hold: asyncio.Event | None = None) -> None:
        raw = {**(headers or {}), **({"authorization": f"Bearer {key}"} if key else {})}
        self.scope = {"type": "http", "method": "POST" if path != "/nodes" else "GET", "path": path,
                      "headers": [(k.encode(), v.encode()) for k, v in raw.items()]}
        self.app, self.body, self.hold = app, body, hold
        self.sent: list[Message] = []
        self.started = asyncio.Event()
        self._given = False

    async def receive(self) -> Message:
        if not self._given:
            self._given = True
            self.started.set()
            return {"type": "http.request", "body": self.body, "more_body": self.hold is not None}
        if self.hold is not None:
            await self.hold.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        self.sent.append(message)

    async def run(self) -> Call:
        await self.app(self.scope, self.receive, self.send)
        return self

    @property
    def status(self) -> int:
        return int(next(m for m in self.sent if m["type"] == "http.response.start")["status"])

    @property
    def headers(self) -> dict[bytes, bytes]:
        return dict(next(m for m in self.sent if m["type"] == "http.response.start")["headers"])

    @property
    def json(self) -> Any:
        return json.loads(b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body"))


def _app(**kw: Any) -> FrontendApp:
    return FrontendApp(FrontendConfig(decode_urls=("http://d0",), api_keys=KEYS, **kw))


def test_keyring_matches_any_key_and_names_none_for_others() -> None:
    ring = KeyRing(KEYS)
    assert ring.match(KEYS[0].encode()) == 0 and ring.match(KEYS[1].encode()) == 1
    for wrong in (None, b"", KEYS[0][:-1].encode(), (KEYS[0] + "x").encode(), KEYS[1].upper().encode()):
        assert ring.match(wrong) is None
    assert not KeyRing(()) and KeyRing(()).match(b"x") is None


def test_api_keys_come_from_flags_file_and_env(tmp_path: Any) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# ops\nfile-key-1\n\n  file-key-2  \n")
    assert api_keys(["flag-key"], str(keys), env={"PD_SERVE_API_KEYS": "env-a, env-b,flag-key"}) == (
        "flag-key", "file-key-1", "file-key-2", "env-a", "env-b")
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(ValueError, match="--api-key-file"):
        api_keys([], str(tmp_path / "empty"), env={})


def test_cluster_token_from_file_then_env_and_old_variables_refused(tmp_path: Any) -> None:
    f = tmp_path / "t"
    f.write_text("from-file\n")
    assert read_cluster_token(f, env={"PD_SERVE_CLUSTER_TOKEN": "env"}) == "from-file"
    assert read_cluster_token(None, env={"PD_SERVE_CLUSTER_TOKEN": " env "}) == "env"
    assert read_cluster_token(None, env={}) is None
    with pytest.raises(ValueError, match="PD_SERVE_BOOTSTRAP_TOKEN is no longer read") as err:
        read_cluster_token(None, env={"PD_SERVE_BOOTSTRAP_TOKEN": "old-secret"})
    assert "old-secret" not in str(err.value)
    (tmp_path / "empty").write_text(" \n")
    with pytest.raises(ValueError, match="--cluster-token-file"):
        read_cluster_token(tmp_path / "empty", env={})


def test_wrong_or_missing_key_is_401_and_every_key_works() -> None:
    app = _app()

    async def go() -> list[Call]:
        return [await Call(app, "/nodes", key=k).run() for k in (None, "nope", KEYS[0], KEYS[1])]

    missing, wrong, first, second = asyncio.run(go())
    assert missing.status == wrong.status == 401 and wrong.json["error"]["code"] == "invalid_api_key"
    assert first.status == second.status == 200 and first.json["admission"]["in_flight"] == 0
    assert all(k not in json.dumps(c.json) for c in (missing, wrong, first) for k in KEYS)


def test_per_key_and_total_concurrency_limits_and_counters_return_to_zero() -> None:
    app = _app(max_concurrent_per_key=1, max_concurrent_requests=3)

    async def go() -> tuple[list[Call], dict[str, Any]]:
        hold = asyncio.Event()
        a1 = Call(app, "/v1/chat/completions", b'{"model"', KEYS[0], hold=hold)
        b1 = Call(app, "/v1/chat/completions", b'{"model"', KEYS[1], hold=hold)
        tasks = [asyncio.create_task(a1.run()), asyncio.create_task(b1.run())]
        await asyncio.wait_for(asyncio.gather(a1.started.wait(), b1.started.wait()), 10)
        busy = {"total": app.admission.total, **app.admission.snapshot()}
        a2 = await Call(app, "/v1/chat/completions", json.dumps(CHAT).encode(), KEYS[0]).run()
        app.admission.max_per_key, app.admission.max_total = 5, 2  # now the total binds, not the key
        b2 = await Call(app, "/v1/chat/completions", json.dumps(CHAT).encode(), KEYS[1]).run()
        hold.set()  # both held clients disconnect
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        return [a2, b2], busy

    (a2, b2), busy = asyncio.run(go())
    assert busy == {"total": 2, "key-0": 1, "key-1": 1}
    assert a2.status == 429 and a2.headers[b"retry-after"] == b"1"
    assert a2.json["error"]["code"] == "too_many_requests" and "--max-concurrent-per-key" in a2.json["error"]["message"]
    assert b2.status == 503 and b2.headers[b"retry-after"] == b"1" and b2.json["error"]["code"] == "overloaded"
    assert app.admission.total == 0 and app.admission.snapshot() == {}


@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        (b"x" * 5000, 413, None, "request_too_large"),
        (json.dumps({**CHAT, "messages": [{"role": "user", "content": "y" * 101}]}).encode(), 400, "messages", "prompt_too_long"),
        (json.dumps({"model": "m", "prompt": "z" * 101}).encode(), 400, "prompt", "prompt_too_long"),
        (json.dumps({**CHAT, "max_tokens": 33}).encode(), 400, "max_tokens", "max_tokens_too_large"),
        (json.dumps({**CHAT, "max_completion_tokens": 99}).encode(), 400, "max_completion_tokens", "max_tokens_too_large"),
    ],
)
def test_size_limits_refuse_and_release(body: bytes, status: int, param: str | None, code: str) -> None:
    app = _app(max_request_bytes=4096, max_prompt_chars=100, max_output_tokens=32, max_concurrent_per_key=1)
    path = "/v1/completions" if b'"prompt"' in body else "/v1/chat/completions"
    call = asyncio.run(Call(app, path, body, KEYS[0]).run())
    assert call.status == status and call.json["error"]["code"] == code and call.json["error"]["param"] == param
    assert app.admission.total == 0 and app.admission.snapshot() == {}


def test_output_cap_is_the_default_max_tokens() -> None:
    config = FrontendConfig(decode_urls=("http://d",), max_output_tokens=64)
    body: dict[str, Any] = dict(CHAT)
    assert cap_output(body, config) and body["max_tokens"] == 64
    kept = {**CHAT, "max_completion_tokens": 8}
    assert not cap_output(kept, config) and "max_tokens" not in kept


def test_admission_without_limits_counts_and_releases_once() -> None:
    admission = Admission(0, 0)
    slot = admission.admit(None)
    assert not isinstance(slot, type(None)) and admission.total == 1
    slot.release()  # type: ignore[union-attr]
    slot.release()  # type: ignore[union-attr]
    assert admission.total == 0 and admission.snapshot() == {}


def test_every_busy_pair_gives_503_with_retry_after_and_nodes_get_the_cluster_token() -> None:
    from pd_serve.frontend.metrics import FrontendMetrics
    from pd_serve.frontend.nodes import Node, NodeSet, layout_key
    from pd_serve.frontend.proxy import Relay
    from pd_serve.frontend.router import Router

    seen: list[tuple[str, str | None]] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.host, request.headers.get("x-pd-cluster-token")))
        if request.url.host.startswith("p"):
            return httpx.Response(200, json={"room": 1})
        return httpx.Response(503, json={"error": {"message": "full", "code": "queue_full"}})

    config = FrontendConfig(bootstrap="http://b:1", cluster_token="tok-123", max_retries=3)
    nodes = NodeSet(config)
    layout = layout_key({"architecture": "Llama", "num_layers": 2, "num_kv_heads": 2, "head_dim": 8, "page_size": 16,
                         "dtype": "float32", "config_hash": "abc"})
    nodes.replace_all([Node("p0", "prefill", "http://p0", layout, 1)]
                      + [Node(f"d{i}", "decode", f"http://d{i}", layout, 1) for i in range(2)])
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def go() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            relay = Relay(config, nodes, Router(config, nodes), http, FrontendMetrics())
            await relay.serve("/v1/chat/completions", CHAT, json.dumps(CHAT).encode(), send)

    asyncio.run(go())
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert start["status"] == 503 and dict(start["headers"])[b"retry-after"] == b"1"
    assert sorted({host for host, _ in seen if host.startswith("d")}) == ["d0", "d1"]  # the other pair was tried
    assert {token for _, token in seen} == {"tok-123"}
    assert nodes.load.snapshot() == {}


async def _echo(scope: Any, receive: Any, send: Any) -> None:
    body = (await receive()).get("body", b"")
    await reply(send, 200, json.dumps({"echo": len(body)}).encode())


@pytest.mark.parametrize(
    ("path", "body", "header", "status"),
    [
        ("/v1/chat/completions", {**CHAT, "pd": {"room": 1, "prefill": "p", "decode": "d"}}, None, 401),
        ("/v1/chat/completions", {**CHAT, "pd": None}, "wrong", 403),
        ("/v1/completions", {"model": "m", "prompt": "x", "pd": {"room": 2}}, "", 403),
        ("/v1/chat/completions", {**CHAT, "pd": {"room": 1, "prefill": "p", "decode": "d"}}, "tok", 200),
        ("/v1/chat/completions", CHAT, None, 200),  # no pd: a plain request, the API key's business
        ("/v1/chat/completions", b'{"model": "m", "temperature": NaN, "pd": {"room": 3}}', None, 401),
        ("/v1/chat/completions", b'{"model": "m", "p\\u0064": {"room": 4}}', "wrong", 403),
        ("/flush_cache", {}, None, 401),
        ("/start_profile", {}, "wrong", 403),
        ("/flush_cache", {}, "tok", 200),
        ("/server_info", {}, None, 200),
    ],
)
def test_node_pd_plane_needs_the_cluster_token(
    path: str, body: dict[str, Any] | bytes, header: str | None, status: int
) -> None:
    plane = ClusterPlane(_echo, "tok", 1 << 20)
    headers = {} if header is None else {"x-pd-cluster-token": header}
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    call = asyncio.run(Call(plane, path, raw, headers=headers).run())
    assert call.status == status, call.json
    if status == 200:
        assert call.json == {"echo": len(raw)}  # the app saw the whole body
    else:
        error = call.json["error"]
        assert "X-PD-Cluster-Token" in error["message"] and "tok" not in error["message"].split("token")[-1]
        assert error["code"] == ("missing_cluster_token" if status == 401 else "invalid_cluster_token")


def test_a_role_without_a_cluster_token_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from pd_serve.cluster_token import warn_if_open

    log = logging.getLogger("pd_serve.test")
    with caplog.at_level(logging.WARNING, logger="pd_serve.test"):
        warn_if_open(log, "prefill node", None)
        warn_if_open(log, "prefill node", "a-token")
    assert len(caplog.records) == 1 and "internal plane of this prefill node" in caplog.records[0].getMessage()
    assert "unauthenticated" in caplog.records[0].getMessage()
