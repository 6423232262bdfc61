"""Load past a cluster's decode capacity queues instead of failing (issue 19).

A real `pd-serve up` cluster (bootstrap, one prefill and one decode node, the frontend; demo model)
whose decode node holds about three requests' KV at a time. Many more requests than that arrive at
once: every one completes (the decode node admits rooms as pages free up, in arrival order; the
prefill node's rooms wait for that admission under the queue timeout, not the 30 s room timeouts),
and afterwards nothing leaked (bench/leakcheck.py). With a frontend queue limit, requests sent while
the decode node is full get 503 with Retry-After and the `overloaded` code, before any node worked
on them, and every other request completes.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from leakcheck import report, wait_idle  # noqa: E402
from upcluster import UpCluster, wait_for  # noqa: E402

MAX_TOKENS = 160
PROMPT = "the quick brown fox jumps over the lazy dog " * 12  # about 100 demo tokens
ARGS = [
    "--model", "demo", "--transfer-backend", "tcp", "--node-arg=--chunked-prefill-size=256",
    # 64 pages of 16 tokens: a request needs 7 pages to be admitted plus 10 of headroom, 17 at its end
    "--decode-arg=--max-total-tokens=1024",
    "--node-arg=--transfer-bootstrap-timeout=5",  # a queue longer than this must not fail rooms
]  # fmt: skip
REQUEST_TIMEOUT_S = 240.0

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def cluster() -> Iterator[UpCluster]:
    up = UpCluster([*ARGS, "--frontend-arg=--max-queued-requests=2"], restart=False)
    try:
        yield up
    finally:
        up.stop()


def _chat(client: httpx.Client, url: str, i: int, stream: bool) -> tuple[int, dict[str, Any] | str, dict[str, str]]:
    body = {
        "model": "demo", "messages": [{"role": "user", "content": f"{i} {PROMPT}"}],
        "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "stream": stream,
    }  # fmt: skip
    r = client.post(f"{url}/v1/chat/completions", json=body, timeout=REQUEST_TIMEOUT_S)
    if r.status_code != 200 or not stream:
        return r.status_code, r.json(), dict(r.headers)
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events[-3:]
    return r.status_code, "".join(events[:-1]), dict(r.headers)


def _burst(url: str, first: int, n: int) -> list[tuple[int, dict[str, Any] | str, dict[str, str]]]:
    with httpx.Client() as client, ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda i: _chat(client, url, i, stream=i % 2 == 0), range(first, first + n)))


def _decode_node(up: UpCluster) -> dict[str, Any]:
    nodes = httpx.get(f"{up.url}/nodes", headers=up.headers, timeout=10).json()["nodes"]
    return next(n for n in nodes if n["role"] == "decode")


def _check_complete(status: int, answer: dict[str, Any] | str) -> None:
    assert status == 200, answer
    if isinstance(answer, dict):  # not streamed
        assert answer["usage"]["completion_tokens"] == MAX_TOKENS, answer["usage"]
    else:
        assert '"finish_reason":"length"' in answer.replace(" ", ""), answer[-300:]


def test_load_past_decode_capacity_queues_and_every_request_completes(cluster: UpCluster) -> None:
    results = _burst(cluster.url, 0, 16)  # at most about three fit the decode node at a time
    for status, answer, _ in results:
        _check_complete(status, answer)
    leaks = wait_idle(cluster.nodes(), cluster.url, 60.0, cluster.headers)
    assert not leaks, report(leaks)


def test_past_the_frontend_queue_limit_requests_get_503_before_any_work(cluster: UpCluster) -> None:
    with ThreadPoolExecutor(1) as background:
        first = background.submit(_burst, cluster.url, 100, 12)
        # the decode node reports its queue (heartbeats) and the frontend marks it full
        wait_for(lambda: _decode_node(cluster)["full"], 60.0, "the decode node reported as full")
        late = _burst(cluster.url, 200, 12)
        early = first.result(timeout=REQUEST_TIMEOUT_S)
    refused = [(answer, headers) for status, answer, headers in early + late if status == 503]
    assert any(status == 503 for status, _, _ in late), "the frontend queue (limit 2) let 12 requests through to a full decode node"
    for answer, headers in refused:  # refused at once, before any node worked on them
        assert isinstance(answer, dict) and answer["error"]["code"] == "overloaded", answer
        assert "retry-after" in headers
    for status, answer, _ in early + late:  # everything else completes (a loaded machine may delay the
        if status != 503:  # first burst's requests past the moment the node is seen full: refused too)
            _check_complete(status, answer)
    metrics = httpx.get(f"{cluster.url}/metrics", headers=cluster.headers, timeout=10).text
    assert f"pd_frontend_queue_refused_total {float(len(refused))}" in metrics
    leaks = wait_idle(cluster.nodes(), cluster.url, 60.0, cluster.headers)
    assert not leaks, report(leaks)
