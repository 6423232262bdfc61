"""Fuzzing the bootstrap service's API over real HTTP.

Properties: no 5xx; every 4xx in the service's documented shape (`{"detail": str}`, and for a 422
`errors: [{field, message}]` naming the broken field); the service alive afterwards, its listing
still valid JSON that re-validates as records, and a normal registration still accepted.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx
import pytest
from fuzz_strategies import hostile, node_id, registration, registration_body
from fuzz_support import Stack, check_bootstrap_answer, encode, fuzz_settings, raw_exchange, raw_status
from hypothesis import given
from hypothesis import strategies as st

from pd_serve.bootstrap.records import NodeList

JSON = {"content-type": "application/json"}
query_value = st.one_of(
    st.sampled_from(["prefill", "decode", "colocated", "", "nan", "inf", "-1", "1e308", "0", "0.01", "\x00", "%ff"]),
    st.text(max_size=12),
)


def _path_id(value: str) -> str:
    return quote(value, safe="")


@fuzz_settings(120)
@given(node_id, registration())
def test_register_generated(bootstrap_http: httpx.Client, nid: str, case: tuple[dict[str, Any], str | None]) -> None:
    body, field = case
    r = bootstrap_http.put(f"/v1/nodes/{_path_id(nid)}", content=encode(body), headers=JSON)
    check_bootstrap_answer(r, field if r.status_code == 422 and _id_ok(r) else None)
    if r.status_code in (200, 201):
        assert r.json()["node_id"] == nid


def _id_ok(r: httpx.Response) -> bool:
    """A 422 about the node id in the path names that, not the body's field."""
    return not any(e["field"] == "node_id" for e in r.json()["errors"])


@fuzz_settings(50)
@given(node_id, st.one_of(st.none(), hostile, st.fixed_dictionaries({"load": st.dictionaries(
    st.sampled_from(["running", "waiting", "free_pages", "other"]), hostile, max_size=3)})))
def test_heartbeat_generated(bootstrap_http: httpx.Client, nid: str, body: Any) -> None:
    content = b"" if body is None else encode(body)
    r = bootstrap_http.post(f"/v1/nodes/{_path_id(nid)}/heartbeat", content=content, headers=JSON)
    check_bootstrap_answer(r)


@fuzz_settings(50)
@given(st.dictionaries(st.sampled_from(["role", "wait", "timeout", "prefill", "decode", "x"]), query_value, max_size=3),
       st.sampled_from(["/v1/nodes", "/v1/pairs/check"]))
def test_queries_generated(bootstrap_http: httpx.Client, params: dict[str, str], path: str) -> None:
    if "wait" in params:
        params["timeout"] = "0.05"  # a wait tag nobody has answers at once; keep the long-poll short anyway
    r = bootstrap_http.get(path, params=params)
    check_bootstrap_answer(r)


@fuzz_settings(30)
@given(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]), node_id,
       st.sampled_from(["/v1/nodes/{}", "/v1/nodes/{}/heartbeat", "/v1/nodes", "/v1/pairs/check", "/{}", "/v1/{}/x"]))
def test_routes_and_methods(bootstrap_http: httpx.Client, method: str, nid: str, template: str) -> None:
    r = bootstrap_http.request(method, template.format(_path_id(nid)))
    check_bootstrap_answer(r)


HOSTILE_BODIES = {
    "deep-array": b"[" * 100000,
    "deep-object": b'{"a":' * 50000,
    "deep-closed-nesting": b'{"role":"prefill","layout":' + b"[" * 5000 + b"]" * 5000 + b"}",
    "invalid-utf8": encode(registration_body()).replace(b"LlamaForCausalLM", b"\xff\xfe\xc0\xaf"),
    "not-json": b"hello",
    "empty": b"",
    "null": b"null",
    "nan-literal": encode(registration_body()).replace(b'"page_size": 16', b'"page_size": NaN'),
    "infinity-literal": encode(registration_body()).replace(b'"total_pages": 128', b'"total_pages": Infinity'),
    "huge-int": encode(registration_body()).replace(b'"num_layers": 2', b'"num_layers": ' + b"9" * 5000),
    "lone-surrogate": encode({**registration_body(), "http_url": "http://x\ud800"}),
    "lone-surrogate-architecture": encode(registration_body()).replace(b"LlamaForCausalLM", b"\\ud800"),
    "oversized": b'{"role":"' + b"x" * 200_000 + b'"}',
    "transfer-list-huge": encode({**registration_body(), "transfer": [{"backend": "tcp", "address": "a:1"}] * 3000}),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_BODIES))
def test_hostile_bodies(bootstrap_http: httpx.Client, name: str) -> None:
    for method, path in (("PUT", "/v1/nodes/fuzz-1"), ("POST", "/v1/nodes/fuzz-1/heartbeat")):
        r = bootstrap_http.request(method, path, content=HOSTILE_BODIES[name], headers=JSON)
        check_bootstrap_answer(r)


def test_raw_http(stack: Stack, bootstrap_http: httpx.Client) -> None:
    port = stack.bootstrap.port
    body = encode(registration_body())
    head = f"PUT /v1/nodes/raw-1 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n".encode()
    cases = {
        "chunked": head + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n",
        "content-length-lies": head + b"Content-Length: 5\r\nConnection: close\r\n\r\n" + body,
        "content-length-bad": head + b"Content-Length: x\r\nConnection: close\r\n\r\n" + body,
    }
    for name, request in cases.items():
        status = raw_status(raw_exchange(port, request))
        assert status is None or status < 500, name
    raw_exchange(port, head + f"Content-Length: {len(body) + 50}\r\n\r\n".encode() + body, close_early=True)


def test_bootstrap_alive_and_consistent(stack: Stack, bootstrap_http: httpx.Client) -> None:
    """Last: the service answers, its listing re-validates, and a normal node still registers."""
    assert stack.bootstrap.alive
    assert bootstrap_http.get("/health").status_code == 200
    listing = bootstrap_http.get("/v1/nodes")
    assert listing.status_code == 200
    NodeList.model_validate_json(listing.content)
    r = bootstrap_http.put("/v1/nodes/fuzz-final", json=registration_body())
    assert r.status_code in (200, 201), r.text
    assert bootstrap_http.get("/v1/nodes/fuzz-final").json()["node_id"] == "fuzz-final"
    assert bootstrap_http.delete("/v1/nodes/fuzz-final").status_code == 204
