"""The checks the node and frontend fuzz tests share: one request sent, its answer judged."""

from __future__ import annotations

import json
from typing import Any

import httpx
from fuzz_cases import Case
from fuzz_support import check_openai_answer, encode, raw_body, raw_status

NOT_JSON = "the body is not valid JSON"  # the frontend's own refusal: no field to name


def post_generated(http: httpx.Client, path: str, body: dict[str, Any], field: str | None) -> None:
    r = http.post(path, content=encode(body), headers={"content-type": "application/json"})
    err = check_openai_answer(r, None if _frontend_refused_json(r) else field)
    if err is None:
        check_success(r)


def post_case(http: httpx.Client, case: Case) -> httpx.Response:
    r = http.post(case.path, content=case.body, headers=case.headers)
    check_openai_answer(r, None if _frontend_refused_json(r) else case.field)
    if r.status_code < 400:
        check_success(r)
    return r


def check_success(r: httpx.Response) -> None:
    """A 2xx is a completion, or an SSE stream of chunks (or an error event) ending in [DONE]."""
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", r.text[-500:]
        for e in events[:-1]:
            chunk = json.loads(e)
            assert "choices" in chunk or set(chunk) == {"error"}, chunk
        return
    body = r.json()
    assert body["object"] in ("chat.completion", "text_completion"), body
    assert body["choices"] and body["usage"]["completion_tokens"] >= 1, body


VALID_RAW = frozenset({"chunked-body", "chunked-1-byte-chunks", "chunked-and-content-length", "header-100k"})


def check_raw_answer(name: str, answer: bytes) -> None:
    """A raw request gets no 5xx; an answer from our app (JSON) is OpenAI-shaped. HTTP-level refusals
    come from Granian before our app sees the request, in Granian's own words. A valid request sent
    in chunks (or with a 100 kB header) is served."""
    status = raw_status(answer)
    if name in VALID_RAW:
        assert status == 200, (name, answer[:500])
    if status is None:
        return  # the server closed the connection: what a server does with bytes that are not HTTP
    assert status < 500, (name, answer[:500])
    body = raw_body(answer)
    if status >= 400 and body.startswith(b"{"):
        err = json.loads(body)["error"]
        assert {"message", "type", "param", "code"} == set(err), (name, err)


def _frontend_refused_json(r: httpx.Response) -> bool:
    if r.status_code != 400:
        return False
    return r.json().get("error", {}).get("message", "").startswith(NOT_JSON)
