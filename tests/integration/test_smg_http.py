"""The SGLang Model Gateway (`smg`, the real binary from PyPI) in PD mode over HTTP in front of real
`pd-serve prefill` and `pd-serve decode` nodes, without our bootstrap service or frontend.

smg adds `bootstrap_host`, `bootstrap_port` and `bootstrap_room` to each body and sends it to both
nodes; the decode node reads the prefill node's transfer endpoint at `bootstrap_host:bootstrap_port`.
The reference is a `pd-serve colocated` node: greedy output must be the same. The cluster token is
smg's `--api-key` (it sends it to workers as `Authorization: Bearer`); clients of smg present it too,
as smg forwards their Authorization header with PD requests. Every smg runs under `timeout`, and
every wait has a deadline. Skipped only when the smg binary is missing.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from frontend_helpers import greedy_chat
from pd_cluster import RoleProcess
from server_helpers import NodeProcess, assert_node_idle, server_info, sse_events, wait_until

from pd_serve.bootstrap.process import ChildProcess, free_port

SMG = shutil.which("smg") or str(Path(sys.executable).parent / "smg")
pytestmark = pytest.mark.skipif(not os.path.exists(SMG), reason=f"the smg binary is missing ({SMG}): pip install smg")

SMG_LIFETIME_S = 900  # `timeout` kills an smg a test left behind
SMG_READY_S = 120.0
TOKEN = secrets.token_urlsafe(24)
CHUNK = 32  # --chunked-prefill-size: the long prompt takes several chunks
NODE_ARGS = ["--chunked-prefill-size", str(CHUNK), "--max-total-tokens", "8192"]
SHORT = "The capital of France is"
LONG = " ".join(f"word{i}" for i in range(150))  # several prefill chunks
MAX_TOKENS = 12


class Smg(ChildProcess):
    """`smg launch --pd-disaggregation` on a free loopback port, ready once every worker is healthy."""

    def __init__(self, prefills: Sequence[tuple[str, int]], decode: str, args: Sequence[str] = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = ["timeout", "-s", "KILL", str(SMG_LIFETIME_S), SMG, "launch", "--pd-disaggregation"]
        for url, bootstrap_port in prefills:
            argv += ["--prefill", url, str(bootstrap_port)]
        argv += ["--decode", decode, "--host", "127.0.0.1", "--port", str(self.port), "--api-key", TOKEN,
                 "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()), "--log-level", "warn",
                 *args]
        super().__init__(argv)
        self.expected = len(prefills) + 1
        self.wait_ready(self._ready, SMG_READY_S, f"smg on {self.url}")

    def _ready(self) -> bool:
        try:
            r = httpx.get(f"{self.url}/workers", headers=_auth(), timeout=5.0)
        except httpx.TransportError:
            return False
        workers = r.json().get("workers", []) if r.status_code == 200 else []
        return len(workers) == self.expected and all(w.get("is_healthy") for w in workers)

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=TOKEN, timeout=120.0, max_retries=0)


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def nodes() -> Iterator[dict[str, Any]]:
    """Two prefill nodes (the first with a --bootstrap-port of its own, the second answering on its HTTP
    port), one decode node, all with the cluster token; and a colocated node, the reference."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PD_SERVE_CLUSTER_TOKEN", TOKEN)
        bootstrap_port = free_port()
        started: list[ChildProcess] = []
        try:
            p1 = RoleProcess("prefill", None, [*NODE_ARGS, "--bootstrap-port", str(bootstrap_port)], wait=False)
            started.append(p1)
            p2 = RoleProcess("prefill", None, NODE_ARGS, wait=False)
            started.append(p2)
            d = RoleProcess("decode", None, NODE_ARGS, wait=False)
            started.append(d)
            env.delenv("PD_SERVE_CLUSTER_TOKEN")
            c = NodeProcess(NODE_ARGS)
            started.append(c)
            for node in (p1, p2, d):
                node.wait()
            yield {"p1": p1, "p1_bootstrap": bootstrap_port, "p2": p2, "decode": d, "colocated": c}
        finally:
            for child in reversed(started):
                child.stop()


@pytest.fixture(scope="module")
def smg(nodes: dict[str, Any]) -> Iterator[Smg]:
    router = Smg([(nodes["p1"].url, nodes["p1_bootstrap"])], nodes["decode"].url)
    yield router
    router.stop()


def _generate(url: str, text: str, stream: bool = False, headers: dict[str, str] | None = None) -> httpx.Response:
    body = {"text": text, "sampling_params": {"max_new_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True},
            "stream": stream}
    return httpx.post(f"{url}/generate", json=body, headers=headers, timeout=120.0)


def test_smg_reads_our_worker_info(smg: Smg, nodes: dict[str, Any]) -> None:
    r = httpx.get(f"{smg.url}/workers", headers=_auth(), timeout=10.0)
    workers = {w["worker_type"]: w for w in r.json()["workers"]}
    assert workers["prefill"]["bootstrap_port"] == nodes["p1_bootstrap"]
    assert workers["prefill"]["runtime_type"] == "sglang"
    assert workers["decode"]["model_id"] == "demo"
    assert workers["decode"]["labels"]["disaggregation_mode"] == "decode"


@pytest.mark.parametrize("prompt", [SHORT, LONG], ids=["short", "longer-than-a-chunk"])
def test_chat_through_smg_equals_colocated(prompt: str, smg: Smg, nodes: dict[str, Any]) -> None:
    reference = greedy_chat(openai.OpenAI(base_url=f"{nodes['colocated'].url}/v1", api_key="x"), prompt, False,
                            MAX_TOKENS)
    received = server_info(nodes["decode"].url)["stats"]["kv_pages_received"]
    client = smg.openai()
    assert greedy_chat(client, prompt, False, MAX_TOKENS) == reference
    assert greedy_chat(client, prompt, True, MAX_TOKENS) == reference
    assert server_info(nodes["decode"].url)["stats"]["kv_pages_received"] > received  # disaggregated: KV moved


def test_generate_and_batched_completions_through_smg(smg: Smg, nodes: dict[str, Any]) -> None:
    reference = _generate(nodes["colocated"].url, LONG).json()
    assert reference["meta_info"]["finish_reason"] == {"type": "length", "length": MAX_TOKENS}
    answer = _generate(smg.url, LONG, headers=_auth())
    assert answer.status_code == 200, answer.text
    assert answer.json()["text"] == reference["text"]
    events = sse_events(_generate(smg.url, LONG, stream=True, headers=_auth()).text.splitlines())
    assert events[-1] == "[DONE]" and events[-2]["text"] == reference["text"]
    assert len(events[-2]["output_ids"]) == MAX_TOKENS
    # a list of prompts: smg sends a list of rooms
    body = {"model": "demo", "prompt": [SHORT, LONG], "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    ref = httpx.post(f"{nodes['colocated'].url}/v1/completions", json=body, timeout=120.0).json()
    got = httpx.post(f"{smg.url}/v1/completions", json=body, headers=_auth(), timeout=120.0)
    assert got.status_code == 200, got.text
    assert [c["text"] for c in got.json()["choices"]] == [c["text"] for c in ref["choices"]]
    assert_node_idle(nodes["decode"].url)
    assert_node_idle(nodes["p1"].url)


def test_sglang_fields_need_the_cluster_token_and_take_the_largest_room(nodes: dict[str, Any]) -> None:
    """Without smg: the same body to both nodes, as smg sends it, with room 2^63 - 1."""
    p1, d = nodes["p1"], nodes["decode"]
    body = {"model": "demo", "prompt": SHORT, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
            "bootstrap_host": "127.0.0.1", "bootstrap_port": nodes["p1_bootstrap"], "bootstrap_room": 2**63 - 1}
    refused = httpx.post(f"{d.url}/v1/completions", json=body, timeout=30.0)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "missing_cluster_token"
    wrong = httpx.post(f"{p1.url}/flush_cache", headers={"Authorization": "Bearer nope"}, timeout=30.0)
    assert wrong.status_code == 403
    assert httpx.get(f"http://127.0.0.1:{nodes['p1_bootstrap']}/pd_bootstrap", timeout=10.0).status_code == 401
    with httpx.Client(headers=_auth(), timeout=120.0) as client:
        results: dict[str, httpx.Response] = {}
        sender = threading.Thread(target=lambda: results.update(p=client.post(f"{p1.url}/v1/completions", json=body)))
        sender.start()
        results["d"] = client.post(f"{d.url}/v1/completions", json=body)
        sender.join(120.0)
    assert results["p"].status_code == 200 and results["p"].json()["room"] == 2**63 - 1
    ref = httpx.post(f"{nodes['colocated'].url}/v1/completions", json=body, timeout=120.0).json()
    assert results["d"].json()["choices"][0]["text"] == ref["choices"][0]["text"]
    null_port = httpx.post(f"{d.url}/v1/completions", json={**body, "bootstrap_port": None}, headers=_auth(),
                           timeout=30.0)
    assert null_port.status_code == 400 and null_port.json()["error"]["param"] == "bootstrap_port"


def test_flush_cache_through_smg_empties_every_prefix_cache(smg: Smg, nodes: dict[str, Any]) -> None:
    assert greedy_chat(smg.openai(), LONG, False, MAX_TOKENS)
    workers = (nodes["p1"].url, nodes["decode"].url)
    for url in workers:
        assert_node_idle(url)
    assert server_info(nodes["p1"].url)["pages"]["cached"] > 0
    r = httpx.post(f"{smg.url}/flush_cache", headers=_auth(), timeout=30.0)
    assert r.status_code == 200 and r.json()["workers_flushed"] == 2, r.text
    for url in workers:
        assert server_info(url)["pages"]["cached"] == 0


def test_kill_9_of_a_prefill_node_smg_retries_and_nothing_leaks(nodes: dict[str, Any]) -> None:
    """Last in the module: it kills the second prefill node. smg alternates between the two
    (round robin); a request on the killed one fails at transport level and smg retries it on the
    other with a new room. The decode node frees whatever the dead node's rooms held."""
    p1, p2, d = nodes["p1"], nodes["p2"], nodes["decode"]
    router = Smg([(p1.url, nodes["p1_bootstrap"]), (p2.url, p2.port)], d.url, ["--prefill-policy", "round_robin"])
    try:
        client = router.openai()
        answers: list[str] = []
        in_flight = threading.Thread(target=lambda: answers.append(greedy_chat(client, LONG, False, 64)))
        in_flight.start()
        wait_until(lambda: not in_flight.is_alive() or server_info(d.url)["idle"]["engine_requests"] > 0, 60.0,
                   "the request reaches the decode node")
        p2.stop(graceful=False)  # SIGKILL to its whole process group: supervisor, worker, engine
        in_flight.join(180.0)
        assert answers and answers[0], "smg did not answer the request in flight"
        reference = greedy_chat(openai.OpenAI(base_url=f"{nodes['colocated'].url}/v1", api_key="x"), SHORT, False,
                                MAX_TOKENS)
        for _ in range(4):  # every other one is first sent to the dead node
            assert greedy_chat(client, SHORT, False, MAX_TOKENS) == reference
        assert_node_idle(d.url)
        assert_node_idle(p1.url)
    finally:
        router.stop()
