"""Fuzzing the frontend's OpenAI endpoints over real HTTP, with a real colocated node behind it.

Properties: no 5xx, every 4xx OpenAI-shaped (naming the broken field, except where the frontend
refuses the body as not JSON at all: NaN, Infinity and lone surrogates are not JSON), the frontend
alive and serving afterwards, its per-node active counters back to 0 and every breaker closed
(a client's bad request is never counted as a node failure), and the node behind it idle.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fuzz_cases import CASES, CHAT, COMPLETIONS, H2_CASES, Case, raw_requests
from fuzz_strategies import hostile, openai_request
from fuzz_support import (
    Stack,
    check_openai_answer,
    encode,
    fuzz_settings,
    raw_exchange,
    serves_normally,
    wait_node_idle,
    wait_until,
)
from hypothesis import given
from hypothesis import strategies as st
from openai_checks import check_raw_answer, post_case, post_generated


@fuzz_settings(60)
@given(openai_request(chat=True))
def test_chat_generated(frontend_http: httpx.Client, case: tuple[dict[str, Any], str | None]) -> None:
    post_generated(frontend_http, CHAT, *case)


@fuzz_settings(40)
@given(openai_request(chat=False))
def test_completions_generated(frontend_http: httpx.Client, case: tuple[dict[str, Any], str | None]) -> None:
    post_generated(frontend_http, COMPLETIONS, *case)


@fuzz_settings(30)
@given(hostile, st.sampled_from([CHAT, COMPLETIONS]))
def test_pd_and_stream_are_checked_at_the_edge(frontend_http: httpx.Client, value: Any, path: str) -> None:
    """`pd` is the frontend's to set, whatever its value; `stream` must be a boolean."""
    body: dict[str, Any] = {"model": "demo", "max_tokens": 1, "pd": value}
    body |= {"messages": [{"role": "user", "content": "x"}]} if path == CHAT else {"prompt": "x"}
    r = frontend_http.post(path, content=encode(body), headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = check_openai_answer(r)
    assert err is not None and err["param"] in ("pd", None), err
    del body["pd"]
    body["stream"] = value
    r = frontend_http.post(path, content=encode(body), headers={"content-type": "application/json"})
    check_openai_answer(r)
    if not isinstance(value, bool) and r.status_code == 400 and r.json()["error"]["param"] is not None:
        assert r.json()["error"]["param"] == "stream"


@fuzz_settings(30)
@given(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
       st.sampled_from(["/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/", "/nodes", "/health"])
       | st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="?#%"),
                 max_size=30).map(lambda s: "/" + s),
       st.dictionaries(st.sampled_from(["content-type", "accept", "x-request-id", "authorization"]),
                       st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
                       max_size=3))
def test_routes_methods_and_headers(frontend_http: httpx.Client, method: str, path: str, headers: dict[str, str]) -> None:
    if path.startswith(("/flush_cache", "/metrics")):
        return  # side effects or Prometheus text: covered by their own tests
    r = frontend_http.request(method, path, headers=headers)
    if path.startswith("/health") and r.status_code == 503:
        return  # /health's own body ({"status": ...}) while a probe of the node is late
    check_openai_answer(r)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_case(frontend_http: httpx.Client, case: Case) -> None:
    post_case(frontend_http, case)


def test_hostile_cases_over_http2(stack: Stack, frontend_http: httpx.Client) -> None:
    assert len(H2_CASES) == 12
    with httpx.Client(base_url=stack.frontend.url, http1=False, http2=True, timeout=180) as h2:
        for case in H2_CASES:
            assert post_case(h2, case).http_version == "HTTP/2"


def test_raw_http(stack: Stack, frontend_http: httpx.Client) -> None:
    for name, (request, close_early) in raw_requests(stack.frontend.port).items():
        check_raw_answer(name, raw_exchange(stack.frontend.port, request, close_early=close_early))


def _settled(http: httpx.Client) -> bool:
    nodes = http.get("/nodes").json()["nodes"]
    return all(n["active"] == 0 and n["breaker"] == "closed" for n in nodes)


def test_frontend_alive_settled_and_serving(stack: Stack, frontend_http: httpx.Client, node_http: httpx.Client) -> None:
    """Last: the frontend still serves, holds nothing, opened no breaker; the node behind it is idle."""
    assert stack.frontend.alive and stack.node.alive
    wait_until(lambda: _settled(frontend_http), 30, f"frontend counters back to 0: {frontend_http.get('/nodes').text}")
    serves_normally(frontend_http, CHAT)
    serves_normally(frontend_http, COMPLETIONS)
    assert frontend_http.get("/v1/models").status_code == 200
    wait_until(lambda: _settled(frontend_http), 30, "frontend counters back to 0 after the last requests")
    wait_node_idle(node_http)
