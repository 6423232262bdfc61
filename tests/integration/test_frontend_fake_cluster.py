"""The frontend against fake prefill/decode nodes (no model): bootstrap discovery, both protocols,
the openai client, auth and errors, spreading, disconnects, static mode, kill -9 and breakers.

One bootstrap, two fake prefill and two fake decode nodes, and one frontend for the module; the
kill -9 test changes the cluster, so it stays last.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from frontend_helpers import FakeNodeProcess, FrontendProcess, expected_words, metric_value, wait_until

from pd_serve.bootstrap.process import BootstrapProcess

KEY = "frontend-key"
HDRS = {"Authorization": f"Bearer {KEY}"}
CHAT = {"model": "demo", "messages": [{"role": "user", "content": "tell me about pages"}], "max_tokens": 6}


class Cluster:
    def __init__(self) -> None:
        self.procs: list[Any] = []
        try:
            self.bootstrap = self._add(BootstrapProcess(args=["--node-ttl", "3"]))
            boot = self.bootstrap.url
            self.prefills = [
                self._add(FakeNodeProcess("prefill", f"prefill-{i}", boot, ["--prefill-delay", "0.02"]))
                for i in range(2)
            ]
            self.decodes = [
                self._add(FakeNodeProcess("decode", f"decode-{i}", boot, ["--token-delay", "0.01"]))
                for i in range(2)
            ]
            self.frontend = self._add(
                FrontendProcess(
                    [
                        "--bootstrap",
                        boot,
                        "--api-key",
                        KEY,
                        "--policy",
                        "round_robin",
                        "--breaker-failures",
                        "1",
                        "--breaker-cooldown",
                        "60",
                        "--probe-interval",
                        "0.5",
                    ]
                )
            )
            wait_until(lambda: len(self.frontend.nodes(KEY)) == 4, 30, "frontend sees all four nodes")
        except BaseException:
            self.stop()
            raise

    def _add(self, proc: Any) -> Any:
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop(graceful=False)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def client(cluster: Cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.frontend.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def test_openai_client_chat_streamed_and_not(client: openai.OpenAI) -> None:
    want = expected_words("tell me about pages", 6)
    whole = client.chat.completions.create(**CHAT)
    assert whole.choices[0].message.content == " ".join(want)
    chunks = list(client.chat.completions.create(**CHAT, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == " ".join(want)
    done = client.completions.create(model="demo", prompt="abc", max_tokens=3)
    assert done.choices[0].text == " ".join(expected_words("abc", 3))


def test_http2_prior_knowledge_and_http1(cluster: Cluster) -> None:
    for http1, http2, version in ((False, True, "HTTP/2"), (True, False, "HTTP/1.1")):
        with httpx.Client(http1=http1, http2=http2, headers=HDRS, timeout=60) as c:
            r = c.post(f"{cluster.frontend.url}/v1/chat/completions", json={**CHAT, "stream": True})
            assert r.status_code == 200 and r.http_version == version
            assert r.text.endswith("data: [DONE]\n\n")


def test_auth_and_openai_shaped_errors(cluster: Cluster) -> None:
    url = cluster.frontend.url
    r = httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(f"{url}/v1/chat/completions", content=b"{not json", headers=HDRS, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "pd": {"room": 1}}, headers=HDRS, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "pd"
    r = httpx.get(f"{url}/v1/chat/completions", headers=HDRS, timeout=30)
    assert r.status_code == 405 and "error" in r.json()
    r = httpx.get(f"{url}/nope", headers=HDRS, timeout=30)
    assert r.status_code == 404 and "error" in r.json()
    assert httpx.get(f"{url}/health", timeout=30).status_code == 200  # open routes need no key
    assert httpx.get(f"{url}/metrics", timeout=30).status_code == 200


def test_models_nodes_and_flush_cache(cluster: Cluster) -> None:
    url = cluster.frontend.url
    assert httpx.get(f"{url}/v1/models", headers=HDRS, timeout=30).json()["data"][0]["id"] == "demo"
    nodes = {n["node_id"]: n for n in cluster.frontend.nodes(KEY)}
    assert set(nodes) == {"prefill-0", "prefill-1", "decode-0", "decode-1"}
    assert all(n["breaker"] == "closed" and n["layout"] for n in nodes.values())
    flushed = httpx.post(f"{url}/flush_cache", headers=HDRS, timeout=30)
    assert flushed.status_code == 200 and set(flushed.json()["nodes"]) == set(nodes)


def test_requests_spread_over_both_pairs(cluster: Cluster, client: openai.OpenAI) -> None:
    before = cluster.frontend.metrics()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(
            pool.map(
                lambda i: client.chat.completions.create(
                    **{**CHAT, "messages": [{"role": "user", "content": f"q{i}"}]}
                ),
                range(20),
            )
        )
    assert all(
        r.choices[0].message.content == " ".join(expected_words(f"q{i}", 6)) for i, r in enumerate(results)
    )
    after = cluster.frontend.metrics()
    for node in ("prefill-0", "prefill-1", "decode-0", "decode-1"):
        sent = metric_value(after, "pd_frontend_node_requests_total", node=node)
        sent -= metric_value(before, "pd_frontend_node_requests_total", node=node)
        assert sent >= 5, (node, sent)
    assert metric_value(after, "pd_frontend_requests_total", route="/v1/chat/completions", status="200") >= 20
    assert metric_value(after, "pd_frontend_time_to_first_token_seconds_count") >= 20


def test_client_disconnect_mid_stream_closes_the_decode_stream(cluster: Cluster) -> None:
    closed_before = sum(d.stats()["streams_closed_early"] for d in cluster.decodes)
    body = {**CHAT, "max_tokens": 2000, "stream": True}
    with (
        httpx.Client(headers=HDRS, timeout=60) as c,
        c.stream("POST", f"{cluster.frontend.url}/v1/chat/completions", json=body) as r,
    ):
        assert r.status_code == 200
        next(r.iter_lines())
    wait_until(
        lambda: sum(d.stats()["streams_closed_early"] for d in cluster.decodes) > closed_before,
        20,
        "the decode node saw the disconnect",
    )
    wait_until(
        lambda: all(n["active"] == 0 for n in cluster.frontend.nodes(KEY)), 20, "frontend load back to 0"
    )


def test_static_mode_sends_prefill_url_and_refuses_incompatible_pairs(cluster: Cluster) -> None:
    p, d = cluster.prefills[0], cluster.decodes[0]
    odd = FakeNodeProcess("prefill", "odd", None, ["--page-size", "32"])
    fronts: list[FrontendProcess] = []
    try:
        fronts.append(FrontendProcess(["--prefill", p.url, "--decode", d.url]))
        r = httpx.post(f"{fronts[0].url}/v1/chat/completions", json=CHAT, timeout=60)
        assert (
            r.status_code == 200 and r.headers["x-pd-prefill"] == p.url
        )  # the decode node used pd.prefill_url
        fronts.append(FrontendProcess(["--prefill", odd.url, "--decode", d.url], wait_healthy=False))
        wait_until(lambda: len(fronts[1].nodes()) == 2, 30, "static nodes probed")
        assert httpx.get(f"{fronts[1].url}/health", timeout=30).status_code == 503
        r = httpx.post(f"{fronts[1].url}/v1/chat/completions", json=CHAT, timeout=60)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert "compatible" in r.json()["error"]["message"]
    finally:
        for f in fronts:
            f.stop()
        odd.stop()


def test_kill_prefill_retries_on_the_other_pair_opens_its_breaker_and_it_leaves(
    cluster: Cluster, client: openai.OpenAI
) -> None:
    dead = cluster.prefills[0]
    os.killpg(dead.pid, signal.SIGKILL)
    dead.popen.wait(10)
    for i in range(6):  # round robin: some of these go to the dead node first
        r = client.chat.completions.create(
            **{**CHAT, "messages": [{"role": "user", "content": f"after {i}"}]}
        )
        assert r.choices[0].message.content == " ".join(expected_words(f"after {i}", 6))
    text = cluster.frontend.metrics()
    assert metric_value(text, "pd_frontend_retries_total") >= 1
    nodes = {n["node_id"]: n for n in cluster.frontend.nodes(KEY)}
    assert "prefill-0" not in nodes or nodes["prefill-0"]["breaker"] == "open"
    wait_until(
        lambda: "prefill-0" not in {n["node_id"] for n in cluster.frontend.nodes(KEY)},
        20,
        "the dead node expires from the node set",
    )
