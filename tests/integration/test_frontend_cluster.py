"""`pd-serve frontend` in front of real nodes: a bootstrap, 2 `pd-serve prefill` and 2 `pd-serve decode`
processes with the demo model, over tcp transfers.

Covered: the openai client (streamed and not, greedy text equal to a decode node serving the request
alone), HTTP/2 with prior knowledge and HTTP/1.1, auth and OpenAI-shaped errors, /v1/models, /nodes
and /flush_cache, spreading over both pairs (the x-pd-prefill/x-pd-decode headers), a client that
disconnects mid-stream, static mode (the decode node finds its peer through `pd.prefill_url`), a
decode node with another page size that must never be paired, and kill -9 of a prefill node (retry on
the other pair, its breaker opens, it leaves after the bootstrap TTL). After each scenario that moves
KV, the live nodes must be idle with every page free.

Everything starts at once for the module (nodes, then three frontends: the bootstrap-fed one, a static
one and a static one whose only pair is incompatible). The kill -9 test changes the cluster: it is last.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from frontend_helpers import FrontendProcess, metric_value
from pd_cluster import RoleProcess
from server_helpers import wait_until

from pd_serve.bootstrap.process import BootstrapProcess, ChildProcess

KEY = "frontend-key"
HDRS = {"Authorization": f"Bearer {KEY}"}
NODE_TTL = 5.0  # bootstrap --node-ttl: how long a killed node stays listed
NODE_ARGS = [
    "--max-total-tokens",
    "2048",
    "--chunked-prefill-size",
    "64",
    "--transfer-backend",
    "tcp",
    "--transfer-timeout",
    "5",
    "--transfer-bootstrap-timeout",
    "5",
]
GREEDY = {"max_tokens": 8, "temperature": 0, "ignore_eos": True}


def _chat(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": "demo", "messages": [{"role": "user", "content": content}], **GREEDY, **extra}


class FrontendCluster:
    def __init__(self) -> None:
        self.children: list[ChildProcess] = []
        try:
            self.bootstrap = self._add(BootstrapProcess(args=["--node-ttl", str(NODE_TTL)]))
            boot = self.bootstrap.url
            self.prefills = [self._add(RoleProcess("prefill", boot, NODE_ARGS, wait=False)) for _ in range(2)]
            self.decodes = [self._add(RoleProcess("decode", boot, NODE_ARGS, wait=False)) for _ in range(2)]
            # not registered: a node refuses to join a bootstrap whose peers it cannot pair with
            self.odd = self._add(RoleProcess("decode", None, [*NODE_ARGS, "--page-size", "32"], wait=False))
            p0, p1, d0 = self.prefills[0].url, self.prefills[1].url, self.decodes[0].url
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
                    ],
                    wait=False,
                )
            )
            self.static = self._add(
                FrontendProcess(["--prefill", p0, "--decode", d0, "--probe-interval", "0.5"], wait=False)
            )
            self.unpaired = self._add(
                FrontendProcess(
                    ["--prefill", p1, "--decode", self.odd.url, "--probe-interval", "0.5"],
                    wait_healthy=False,
                    wait=False,
                )
            )
            for node in (*self.prefills, *self.decodes, self.odd):
                node.wait()
            for front in (self.frontend, self.static, self.unpaired):
                front.wait()
            wait_until(lambda: len(self.frontend.nodes(KEY)) == 4, 30, "the frontend sees all four nodes")
        except BaseException:
            self.stop()
            raise

    def _add(self, child: Any) -> Any:
        self.children.append(child)
        return child

    def node(self, node_id: str) -> RoleProcess:
        return next(n for n in (*self.prefills, *self.decodes) if n.node_id == node_id)

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop(graceful=False)


@pytest.fixture(scope="module")
def cluster() -> Iterator[FrontendCluster]:
    c = FrontendCluster()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def client(cluster: FrontendCluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.frontend.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def _alone(node: RoleProcess, body: dict[str, Any]) -> str:
    """The text a decode node gives for `body` served alone (no `pd`: it prefills locally)."""
    r = httpx.post(f"{node.url}/v1/chat/completions", json={**body, "stream": False}, timeout=120)
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["message"]["content"])


def _post(url: str, body: dict[str, Any], headers: dict[str, str] = HDRS) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=120)


def _assert_no_leak(*nodes: RoleProcess, timeout: float = 30.0) -> None:
    """Each node goes idle (nothing running, waiting, in transfer or in flight) with every page free."""
    for node in nodes:
        deadline = time.monotonic() + timeout
        while True:
            info = node.server_info()
            s = info["stats"]
            busy = s["num_running"] or s["num_waiting"] or s["num_in_transfer"] or info["in_flight"]
            if not busy and info["pages"]["free"] == info["pages"]["total"]:
                break
            assert time.monotonic() < deadline, f"{node.node_id} not idle: {s}, pages {info['pages']}"
            time.sleep(0.1)


def _node_metric(node: RoleProcess, name: str, **labels: str) -> float:
    return metric_value(httpx.get(f"{node.url}/metrics", timeout=10).text, name, **labels)


def test_openai_client_chat_streamed_and_not(cluster: FrontendCluster, client: openai.OpenAI) -> None:
    body = _chat("tell me about pages")
    want = _alone(cluster.decodes[1], body)
    assert want
    kw = {k: v for k, v in body.items() if k != "ignore_eos"}
    whole = client.chat.completions.create(**kw, extra_body={"ignore_eos": True})
    assert whole.choices[0].message.content == want
    chunks = client.chat.completions.create(**kw, stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    done = client.completions.create(model="demo", prompt="abc", max_tokens=3, temperature=0)
    direct = httpx.post(
        f"{cluster.decodes[0].url}/v1/completions",
        json={"model": "demo", "prompt": "abc", "max_tokens": 3, "temperature": 0},
        timeout=120,
    )
    assert done.choices[0].text == direct.json()["choices"][0]["text"]
    _assert_no_leak(*cluster.prefills, *cluster.decodes)


def test_http2_prior_knowledge_and_http1(cluster: FrontendCluster) -> None:
    for http1, http2, version in ((False, True, "HTTP/2"), (True, False, "HTTP/1.1")):
        with httpx.Client(http1=http1, http2=http2, headers=HDRS, timeout=120) as c:
            r = c.post(
                f"{cluster.frontend.url}/v1/chat/completions", json=_chat("which protocol", stream=True)
            )
            assert r.status_code == 200 and r.http_version == version, r.text
            assert r.text.endswith("data: [DONE]\n\n")
    _assert_no_leak(*cluster.prefills, *cluster.decodes)


def test_auth_and_openai_shaped_errors(cluster: FrontendCluster) -> None:
    url = cluster.frontend.url
    r = _post(url, _chat("no key"), headers={})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(f"{url}/v1/chat/completions", content=b"{not json", headers=HDRS, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = _post(url, {**_chat("client pd"), "pd": {"room": 1}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "pd"
    r = httpx.get(f"{url}/v1/chat/completions", headers=HDRS, timeout=30)
    assert r.status_code == 405 and "error" in r.json()
    r = httpx.get(f"{url}/nope", headers=HDRS, timeout=30)
    assert r.status_code == 404 and "error" in r.json()
    # a node's own validation error comes back as it is (a client error: not retried)
    retries = metric_value(cluster.frontend.metrics(), "pd_frontend_retries_total")
    r = _post(url, _chat("bad", max_tokens=-1))
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
    assert metric_value(cluster.frontend.metrics(), "pd_frontend_retries_total") == retries
    assert httpx.get(f"{url}/health", timeout=30).status_code == 200  # open routes need no key
    assert httpx.get(f"{url}/metrics", timeout=30).status_code == 200
    _assert_no_leak(*cluster.prefills, *cluster.decodes)


def test_models_nodes_and_flush_cache(cluster: FrontendCluster) -> None:
    url = cluster.frontend.url
    assert httpx.get(f"{url}/v1/models", headers=HDRS, timeout=30).json()["data"][0]["id"] == "demo"
    nodes = {n["node_id"]: n for n in cluster.frontend.nodes(KEY)}
    assert set(nodes) == {n.node_id for n in (*cluster.prefills, *cluster.decodes)}
    assert all(n["breaker"] == "closed" and n["layout"]["page_size"] == 16 for n in nodes.values())
    flushed = httpx.post(f"{url}/flush_cache", headers=HDRS, timeout=30)
    assert flushed.status_code == 200 and set(flushed.json()["nodes"]) == set(nodes)
    assert all(answer["status"] == 200 for answer in flushed.json()["nodes"].values()), flushed.text


def test_requests_spread_over_both_pairs(cluster: FrontendCluster) -> None:
    bodies = [_chat(f"question {i} about the page table") for i in range(40)]
    before = cluster.frontend.metrics()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda b: _post(cluster.frontend.url, b), bodies))
        want = list(pool.map(lambda b: _alone(cluster.decodes[0], b), bodies))
    for r, text in zip(got, want):
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == text
    assert {r.headers["x-pd-prefill"] for r in got} == {n.node_id for n in cluster.prefills}
    assert {r.headers["x-pd-decode"] for r in got} == {n.node_id for n in cluster.decodes}
    after = cluster.frontend.metrics()
    for name, labels in (
        ("pd_frontend_requests_total", {"route": "/v1/chat/completions", "status": "200"}),
        ("pd_frontend_time_to_first_token_seconds_count", {}),
    ):
        assert metric_value(after, name, **labels) - metric_value(before, name, **labels) >= len(bodies), name
    for node in (*cluster.prefills, *cluster.decodes):  # each node really served some of them
        assert _node_metric(node, "pd_node_requests_total", route="/v1/chat/completions", status="200") >= 1
    _assert_no_leak(*cluster.prefills, *cluster.decodes)


def test_client_disconnect_mid_stream_frees_both_nodes(cluster: FrontendCluster) -> None:
    max_tokens = 1500
    body = _chat("keep talking", max_tokens=max_tokens, stream=True)
    before = {n.node_id: _node_metric(n, "pd_node_generation_tokens_total") for n in cluster.decodes}
    with (
        httpx.Client(headers=HDRS, timeout=120) as c,
        c.stream("POST", f"{cluster.frontend.url}/v1/chat/completions", json=body) as r,
    ):
        assert r.status_code == 200
        prefill, decode = cluster.node(r.headers["x-pd-prefill"]), cluster.node(r.headers["x-pd-decode"])
        events = 0
        for line in r.iter_lines():
            events += line.startswith("data: ")
            if events == 3:
                break
    _assert_no_leak(prefill, decode)
    generated = _node_metric(decode, "pd_node_generation_tokens_total") - before[decode.node_id]
    assert generated < max_tokens, "the decode node ran the request to its end: the disconnect was lost"
    wait_until(
        lambda: all(n["active"] == 0 for n in cluster.frontend.nodes(KEY)), 20, "frontend load back to 0"
    )


def test_static_mode_sends_prefill_url(cluster: FrontendCluster) -> None:
    p, d = cluster.prefills[0], cluster.decodes[0]
    body = _chat("static pairs")
    r = _post(cluster.static.url, body, headers={})
    # node ids are URLs here, unknown to bootstrap: the decode node found its peer through pd.prefill_url
    assert r.status_code == 200, r.text
    assert r.headers["x-pd-prefill"] == p.url and r.headers["x-pd-decode"] == d.url
    assert r.json()["choices"][0]["message"]["content"] == _alone(cluster.decodes[1], body)
    _assert_no_leak(p, d)


def test_incompatible_pair_is_refused(cluster: FrontendCluster) -> None:
    front, odd = cluster.unpaired, cluster.odd
    assert odd.server_info()["layout"]["page_size"] == 32
    wait_until(lambda: sum(n["layout"] is not None for n in front.nodes()) == 2, 30, "static nodes probed")
    assert httpx.get(f"{front.url}/health", timeout=30).status_code == 503
    sent_to_prefill = _node_metric(
        cluster.prefills[1], "pd_node_requests_total", route="/v1/chat/completions"
    )
    r = _post(front.url, _chat("never paired"), headers={})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert "compatible" in r.json()["error"]["message"]
    assert _node_metric(odd, "pd_node_requests_total", route="/v1/chat/completions") == 0
    assert _node_metric(cluster.prefills[1], "pd_node_requests_total", route="/v1/chat/completions") == (
        sent_to_prefill
    )


def test_kill_prefill_retries_on_the_other_pair_opens_its_breaker_and_it_leaves(
    cluster: FrontendCluster,
) -> None:
    """Last: prefill-0 is killed (its whole process group) and stays dead."""
    dead, live = cluster.prefills
    os.killpg(dead.pid, signal.SIGKILL)
    dead.popen.wait(10)
    bodies = [_chat(f"after the kill {i}") for i in range(6)]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:  # round robin sends some to the dead node first
        got = list(pool.map(lambda b: _post(cluster.frontend.url, b), bodies))
        want = list(pool.map(lambda b: _alone(cluster.decodes[1], b), bodies))
    for r, text in zip(got, want):
        assert r.status_code == 200, r.text
        assert r.headers["x-pd-prefill"] == live.node_id
        assert r.json()["choices"][0]["message"]["content"] == text
    assert any(r.headers["x-pd-attempts"] != "1" for r in got)
    assert metric_value(cluster.frontend.metrics(), "pd_frontend_retries_total") >= 1
    nodes = {n["node_id"]: n for n in cluster.frontend.nodes(KEY)}
    assert dead.node_id not in nodes or nodes[dead.node_id]["breaker"] == "open"
    wait_until(
        lambda: dead.node_id not in {n["node_id"] for n in cluster.frontend.nodes(KEY)},
        NODE_TTL + 20,
        "the dead node expires from the node set",
    )
    _assert_no_leak(live, *cluster.decodes)
    r = _post(cluster.frontend.url, _chat("after it left"))
    assert r.status_code == 200 and r.headers["x-pd-prefill"] == live.node_id, r.text
    assert json.loads(r.text)["choices"][0]["message"]["content"]
