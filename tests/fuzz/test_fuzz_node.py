"""Fuzzing a colocated node's OpenAI endpoints (and its `pd` field) over real HTTP.

Properties: no 5xx, every 4xx OpenAI-shaped and naming the broken field, the node and its engine
alive afterwards and serving, and nothing leaked (pages free, no engine request, no slot or
stream held). The last test of the module checks the last two; keep it last.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fuzz_cases import CASES, CHAT, COMPLETIONS, H2_CASES, Case, raw_requests
from fuzz_strategies import hostile, openai_request
from fuzz_support import (
    MODEL,
    Stack,
    check_openai_answer,
    encode,
    fuzz_settings,
    raw_exchange,
    serves_normally,
    wait_node_idle,
)
from hypothesis import given
from hypothesis import strategies as st
from openai_checks import check_raw_answer, post_case, post_generated

json_value = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@fuzz_settings(80)
@given(openai_request(chat=True))
def test_chat_generated(node_http: httpx.Client, case: tuple[dict[str, Any], str | None]) -> None:
    post_generated(node_http, CHAT, *case)


@fuzz_settings(60)
@given(openai_request(chat=False))
def test_completions_generated(node_http: httpx.Client, case: tuple[dict[str, Any], str | None]) -> None:
    post_generated(node_http, COMPLETIONS, *case)


pd_object = st.one_of(
    st.fixed_dictionaries({"room": st.integers(0, 2**63 - 1), "prefill": st.text(max_size=8),
                           "decode": st.text(max_size=8)},
                          optional={"prefill_url": st.text(max_size=12), "extra": hostile}),
    st.dictionaries(st.sampled_from(["room", "prefill", "decode", "prefill_url"]), hostile, max_size=4),
    hostile.filter(lambda v: v is not None),
)


@fuzz_settings(40)
@given(pd_object, st.sampled_from([CHAT, COMPLETIONS]))
def test_pd_field_is_refused_by_a_colocated_node(node_http: httpx.Client, pd: Any, path: str) -> None:
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 1, "pd": pd}
    body |= {"messages": [{"role": "user", "content": "x"}]} if path == CHAT else {"prompt": "x"}
    r = node_http.post(path, content=encode(body), headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    check_openai_answer(r, "pd")


@fuzz_settings(40)
@given(json_value, st.sampled_from([CHAT, COMPLETIONS]))
def test_any_json_body(node_http: httpx.Client, body: Any, path: str) -> None:
    r = node_http.post(path, content=encode(body), headers={"content-type": "application/json"})
    check_openai_answer(r)


@fuzz_settings(30)
@given(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
       st.sampled_from(["/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/", "/v1/models/x"])
       | st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="?#%"),
                 max_size=30).map(lambda s: "/" + s))
def test_routes_and_methods(node_http: httpx.Client, method: str, path: str) -> None:
    if path in ("/start_profile", "/stop_profile", "/flush_cache") or path.startswith("/metrics"):
        return  # admin routes with side effects; their own tests cover them
    r = node_http.request(method, path)
    check_openai_answer(r)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_case(node_http: httpx.Client, case: Case) -> None:
    post_case(node_http, case)


def test_hostile_cases_over_http2(stack: Stack, node_http: httpx.Client) -> None:
    assert len(H2_CASES) == 12
    with httpx.Client(base_url=stack.node.url, http1=False, http2=True, timeout=180) as h2:
        for case in H2_CASES:
            assert post_case(h2, case).http_version == "HTTP/2"


def test_raw_http(stack: Stack, node_http: httpx.Client) -> None:
    for name, (request, close_early) in raw_requests(stack.node.port).items():
        check_raw_answer(name, raw_exchange(stack.node.port, request, close_early=close_early))


def test_node_alive_idle_and_serving(stack: Stack, node_http: httpx.Client) -> None:
    """Last: after all of the above the node (and its engine) still serves, and nothing leaked."""
    assert stack.node.alive
    assert node_http.get("/health").status_code == 200
    wait_node_idle(node_http)
    serves_normally(node_http, CHAT)
    serves_normally(node_http, COMPLETIONS)
    wait_node_idle(node_http)
