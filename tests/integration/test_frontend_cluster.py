"""`pd-serve up --num-prefill 2 --num-decode 2` (demo model, tcp transfers) driven through its frontend.

Beside the cluster, for the module: one `pd-serve colocated` node (the greedy reference), and one
decode node with another page size behind a static frontend of its own with prefill-1, a pair that
must never be formed. Covered: the openai client (chat, streamed and not, over HTTP/2 too) equal to
colocated, 40 requests spread over both pairs (per-node counts from the frontend's /metrics), /nodes
and /flush_cache, a client that disconnects mid-stream, 503 when no compatible pair exists, and
kill -9 of prefill-0 while requests arrive: every request that had not started streaming succeeds
through the other pair, and prefill-0 leaves the node set. After each scenario that moves KV the
live nodes must be idle with every page free. The kill test changes the cluster and is followed by
SIGTERM of `up`: nothing of its tree may be left, the killed child included.
1P1D, the API key and the 4xx bodies, and static pairs are test_frontend_up.py.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from frontend_helpers import FrontendProcess, UpProcess, descendants, greedy_chat, metric_value
from pd_cluster import RoleProcess
from server_helpers import NodeProcess, pid_alive, wait_until

from pd_serve.cli import SUBCOMMANDS

pytestmark = pytest.mark.skipif(
    "decode" not in SUBCOMMANDS, reason="pd-serve prefill/decode are not registered in pd_serve/cli.py yet"
)
KEY = "frontend-key"
HDRS = {"Authorization": f"Bearer {KEY}"}
NODE_TTL = 5.0  # bootstrap --node-ttl: how long a killed node stays listed
NODE_ARGS = [
    "--max-total-tokens",
    "2048",
    "--chunked-prefill-size",
    "64",
    "--transfer-timeout",
    "5",
    "--transfer-bootstrap-timeout",
    "5",
]
UP_ARGS = [
    "--model",
    "demo",
    "--num-prefill",
    "2",
    "--num-decode",
    "2",
    *(f"--node-arg={a}" for a in NODE_ARGS),
    f"--bootstrap-arg=--node-ttl={NODE_TTL}",
    *(
        f"--frontend-arg={a}"
        for a in ("--breaker-failures=1", "--breaker-cooldown=60", "--probe-interval=0.5")
    ),
]
PREFILLS, DECODES = ("prefill-0", "prefill-1"), ("decode-0", "decode-1")


class Cluster:
    def __init__(self) -> None:
        self.up = UpProcess(UP_ARGS, KEY)
        self.others: list[Any] = []
        try:
            # not registered: a node refuses to join a bootstrap whose peers it cannot pair with
            self.odd = RoleProcess(
                "decode", None, [*NODE_ARGS, "--page-size", "32"], wait=False
            )
            self.others.append(self.odd)
            self.colocated = NodeProcess()
            self.others.append(self.colocated)
            self.up.wait_ready()
            self.odd.wait()
            self.urls = {n["node_id"]: n["url"] for n in self.nodes()}
            self.unpaired = FrontendProcess(
                ["--prefill", self.urls["prefill-1"], "--decode", self.odd.url, "--probe-interval", "0.5"],
                wait_healthy=False,
                env=self.up.env,
            )
            self.others.append(self.unpaired)
        except BaseException:
            self.stop()
            raise

    def nodes(self) -> list[dict[str, Any]]:
        return list(httpx.get(f"{self.up.url}/nodes", headers=HDRS, timeout=30).json()["nodes"])

    def metrics(self) -> str:
        return httpx.get(f"{self.up.url}/metrics", timeout=30).text

    def stop(self) -> None:
        for child in reversed(self.others):
            child.stop(graceful=False)
        self.up.kill()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def client(cluster: Cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.up.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def _chat(content: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": "demo",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 4,
        "temperature": 0,
        "ignore_eos": True,
        **extra,
    }


def _post(url: str, body: dict[str, Any], headers: dict[str, str] = HDRS) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=120)


def _text(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["message"]["content"])


def _get(url: str) -> Any:
    r = httpx.get(url, timeout=10)
    r.raise_for_status()
    return r.json() if r.headers["content-type"].startswith("application/json") else r.text


def _assert_no_leak(cluster: Cluster, *node_ids: str, timeout: float = 30.0) -> None:
    """Each node goes idle (nothing running, waiting, in transfer or in flight) with every page free."""
    for node_id in node_ids:
        deadline = time.monotonic() + timeout
        while True:
            info = _get(f"{cluster.urls[node_id]}/server_info")
            s = info["stats"]
            busy = s["num_running"] or s["num_waiting"] or s["num_in_transfer"] or info["in_flight"]
            if not busy and info["pages"]["free"] == info["pages"]["total"]:
                break
            assert time.monotonic() < deadline, f"{node_id} not idle: {s}, pages {info['pages']}"
            time.sleep(0.1)


def test_openai_client_chat_streamed_and_not_equals_colocated(
    cluster: Cluster, client: openai.OpenAI
) -> None:
    direct = openai.OpenAI(base_url=f"{cluster.colocated.url}/v1", api_key="none", max_retries=0, timeout=120)
    for stream in (False, True):
        assert greedy_chat(client, "tell me about pages", stream) == greedy_chat(
            direct, "tell me about pages", stream
        )
    with httpx.Client(http1=False, http2=True, headers=HDRS, timeout=120) as c:
        r = c.post(f"{cluster.up.url}/v1/chat/completions", json=_chat("which protocol", stream=True))
    assert r.status_code == 200 and r.http_version == "HTTP/2" and r.text.endswith("data: [DONE]\n\n"), r.text
    _assert_no_leak(cluster, *PREFILLS, *DECODES)


def test_nodes_and_flush_cache(cluster: Cluster) -> None:
    nodes = {n["node_id"]: n for n in cluster.nodes()}
    assert set(nodes) == {*PREFILLS, *DECODES}
    assert all(n["breaker"] == "closed" and n["layout"]["page_size"] == 16 for n in nodes.values())
    flushed = httpx.post(f"{cluster.up.url}/flush_cache", headers=HDRS, timeout=30)
    assert flushed.status_code == 200 and set(flushed.json()["nodes"]) == set(nodes)
    assert all(answer["status"] == 200 for answer in flushed.json()["nodes"].values()), flushed.text


def test_requests_spread_over_both_pairs(cluster: Cluster) -> None:
    bodies = [_chat(f"question {i} about the page table") for i in range(40)]
    before = cluster.metrics()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda b: _post(cluster.up.url, b), bodies))
        want = list(pool.map(lambda b: _post(cluster.colocated.url, b, headers={}), bodies))
    assert [_text(r) for r in got] == [_text(r) for r in want]
    after = cluster.metrics()

    def sent(name: str, **labels: str) -> float:
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    for node_id in (*PREFILLS, *DECODES):  # round robin: each node of both pairs took its share
        assert sent("pd_frontend_node_requests_total", node=node_id) >= 10, node_id
    assert sent("pd_frontend_node_requests_total", role="prefill") == len(bodies)
    assert sent("pd_frontend_requests_total", route="/v1/chat/completions", status="200") == len(bodies)
    _assert_no_leak(cluster, *PREFILLS, *DECODES)


def test_client_disconnect_mid_stream_frees_both_nodes(cluster: Cluster) -> None:
    max_tokens = 1500
    body = _chat("keep talking", max_tokens=max_tokens, stream=True)

    def generated(node_id: str) -> float:
        return metric_value(_get(f"{cluster.urls[node_id]}/metrics"), "pd_node_generation_tokens_total")

    before = {d: generated(d) for d in DECODES}
    with (
        httpx.Client(headers=HDRS, timeout=120) as c,
        c.stream("POST", f"{cluster.up.url}/v1/chat/completions", json=body) as r,
    ):
        assert r.status_code == 200
        prefill, decode = r.headers["x-pd-prefill"], r.headers["x-pd-decode"]
        events = 0
        for line in r.iter_lines():
            events += line.startswith("data: ")
            if events == 3:
                break
    _assert_no_leak(cluster, prefill, decode)
    assert generated(decode) - before[decode] < max_tokens, (
        "the decode node ran to the end: the disconnect was lost"
    )
    wait_until(lambda: all(n["active"] == 0 for n in cluster.nodes()), 20, "frontend load back to 0")


def test_no_compatible_pair_is_503_with_a_message(cluster: Cluster) -> None:
    front, odd = cluster.unpaired, cluster.odd
    assert odd.server_info()["layout"]["page_size"] == 32
    wait_until(lambda: sum(n["layout"] is not None for n in front.nodes()) == 2, 30, "static nodes probed")
    assert httpx.get(f"{front.url}/health", timeout=30).status_code == 503
    prefill_1 = cluster.urls["prefill-1"]
    sent = metric_value(_get(f"{prefill_1}/metrics"), "pd_node_requests_total", route="/v1/chat/completions")
    r = _post(front.url, _chat("never paired"), headers={})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["type"] and "compatible" in r.json()["error"]["message"]
    assert (
        metric_value(_get(f"{odd.url}/metrics"), "pd_node_requests_total", route="/v1/chat/completions") == 0
    )
    assert (
        metric_value(_get(f"{prefill_1}/metrics"), "pd_node_requests_total", route="/v1/chat/completions")
        == sent
    )


class Traffic:
    """Streamed chat requests from `workers` threads until `total` were sent; per request: whether its
    first chunk came before the kill (`started_before`), and its text or the error it ended with."""

    def __init__(self, client: openai.OpenAI, total: int, workers: int) -> None:
        self.client, self.total = client, total
        self.killed = threading.Event()
        self.done = 0
        self.results: list[tuple[bool, str | None, str | None]] = []  # (started_before, text, error)
        self._lock = threading.Lock()
        self._next = 0
        self.pool = concurrent.futures.ThreadPoolExecutor(workers)
        self.futures = [self.pool.submit(self._worker) for _ in range(workers)]

    def _worker(self) -> None:
        while True:
            with self._lock:
                i, self._next = self._next, self._next + 1
            if i >= self.total:
                return
            self.results.append(self._one(i))
            with self._lock:
                self.done += 1

    def _one(self, i: int) -> tuple[bool, str | None, str | None]:
        started_before, text = False, ""
        try:
            stream = self.client.chat.completions.create(
                model="demo",
                messages=[{"role": "user", "content": f"during the kill {i}"}],
                max_tokens=4,
                temperature=0,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            for n, chunk in enumerate(stream):
                if n == 0:
                    started_before = not self.killed.is_set()
                text += (chunk.choices[0].delta.content or "") if chunk.choices else ""
        except openai.OpenAIError as exc:
            return started_before, None, f"{type(exc).__name__}: {exc}"
        return started_before, text, None

    def broken(self) -> bool:
        """A worker ended early (an exception that is not an OpenAI error): `wait` raises it."""
        return any(f.done() for f in self.futures) and self.done < self.total

    def wait(self) -> None:
        for f in self.futures:
            f.result(timeout=300)
        self.pool.shutdown()


@pytest.mark.skipif(importlib.util.find_spec("setproctitle") is None, reason="Granian retitles only with it")
def test_processes_keep_their_command_line(cluster: Cluster) -> None:
    """With setproctitle installed (smg depends on it) Granian would retitle every process "granian
    asgi ADDR TARGET"; ours keep the command line that started them, so ps and pgrep find each role."""
    pid = cluster.up.child_pid("prefill-0")
    titles = [Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
              for p in [pid, *descendants(pid)]]
    assert not any(t.startswith("granian") for t in titles), titles
    assert any("prefill" in t and t.endswith("worker-1") for t in titles), titles


def test_kill_prefill_while_requests_arrive(cluster: Cluster, client: openai.OpenAI) -> None:
    """Changes the cluster: prefill-0 is killed (its process group) and stays dead."""
    retries = metric_value(cluster.metrics(), "pd_frontend_retries_total")
    victim = cluster.up.child_pid("prefill-0")
    traffic = Traffic(client, total=24, workers=4)
    wait_until(lambda: traffic.done >= 4 or traffic.broken(), 120, "the first requests end")
    traffic.killed.set()
    os.killpg(victim, signal.SIGKILL)
    traffic.wait()
    assert len(traffic.results) == 24
    assert any(not started_before for started_before, _, _ in traffic.results)
    for started_before, text, error in traffic.results:
        assert started_before or (text is not None and error is None), (
            error
        )  # only a running stream may break
    assert (
        metric_value(cluster.metrics(), "pd_frontend_retries_total") > retries
    )  # some went to prefill-0 first
    wait_until(
        lambda: "prefill-0" not in {n["node_id"] for n in cluster.nodes()},
        NODE_TTL + 20,
        "the dead node leaves the node set",
    )
    _assert_no_leak(cluster, "prefill-1", *DECODES)
    r = _post(cluster.up.url, _chat("after it left"))
    assert _text(r) and r.headers["x-pd-prefill"] == "prefill-1"


def test_sigterm_of_up_after_a_child_died_leaves_nothing(cluster: Cluster) -> None:
    tree = descendants(cluster.up.popen.pid)
    assert len(tree) >= 4
    cluster.up.popen.send_signal(signal.SIGTERM)
    assert cluster.up.popen.wait(60) == 0
    wait_until(lambda: not any(pid_alive(p) for p in tree), 30, "every process of the up tree exits")
