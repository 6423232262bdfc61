"""`pd-serve prefill` + `pd-serve decode` with a real bootstrap: outputs, failures, and no leaks.

Requests go to both nodes at once with a `pd` object, as the frontend sends them. The reference is a
`pd-serve colocated` node on the same model: greedy output must be the same, token for token.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from typing import Any

import httpx
import pytest
from pd_cluster import Cluster, RoleProcess, pd_request
from server_helpers import NodeProcess

NODE_ARGS = ["--chunked-prefill-size", "64", "--max-total-tokens", "8192", "--transfer-timeout", "5",
             "--transfer-bootstrap-timeout", "5", "--queue-timeout", "5"]
PROMPTS = [("The decode node " * n).strip() for n in (1, 3, 9, 30, 2, 14, 45, 5)] * 2  # some over 64 tokens


def _body(prompt: str, stream: bool = False, max_tokens: int = 12) -> dict[str, Any]:
    return {"model": "demo", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": stream}


@pytest.fixture(scope="module")
def colocated():
    node = NodeProcess(["--chunked-prefill-size", "64", "--max-total-tokens", "8192"])
    yield node
    node.stop()


@pytest.fixture(scope="module")
def cluster():
    """The cluster most tests share, on the default backend (auto: cma, both nodes on this host);
    the last test of the module kills its nodes."""
    c = Cluster(NODE_ARGS)
    yield c
    c.stop()


def _idle(node: RoleProcess, timeout: float = 30.0) -> dict[str, Any]:
    """Wait until the node has no request in flight; returns its server_info."""
    deadline = time.monotonic() + timeout
    while True:
        info = node.server_info()
        s = info["stats"]
        if s["num_running"] == 0 and s["num_waiting"] == 0 and s["num_in_transfer"] == 0 and info["in_flight"] == 0:
            return info
        assert time.monotonic() < deadline, f"{node.role} node did not go idle: {info['stats']}"
        time.sleep(0.1)


def _assert_no_leak(*nodes: RoleProcess) -> None:
    for node in nodes:
        pages = _idle(node)["pages"]
        assert pages["free"] == pages["total"], f"{node.role} node leaked pages: {pages}"


def _stream_text(response_lines: list[str]) -> str:
    text = ""
    for line in response_lines:
        if line.startswith("data: ") and line != "data: [DONE]":
            chunk = json.loads(line[6:])
            text += "".join(c.get("text", "") for c in chunk["choices"])
    return text


@pytest.mark.parametrize("backend", ["ucx", "tcp"])
def test_greedy_outputs_equal_colocated_over_forced_backends(backend: str, colocated: NodeProcess) -> None:
    """First in the module, before the shared cluster starts: its tests then run back to back, and
    the decode node still holds the prefill node's record (cached for 30 s) when test_node_deaths needs it."""
    c = Cluster([*NODE_ARGS, "--transfer-backend", backend])
    try:
        assert c.prefill.server_info()["transfer_backends"] == [backend]
        _check_equal_outputs(c, colocated)
        _check_backend(c, backend, backend)
    finally:
        c.stop()


def test_greedy_outputs_equal_colocated(cluster: Cluster, colocated: NodeProcess) -> None:
    _check_equal_outputs(cluster, colocated)
    _check_backend(cluster, "auto", "cma")


def _check_backend(cluster: Cluster, configured: str, chosen: str) -> None:
    """/server_info shows the backend as configured and the one each connection chose; /metrics counts
    the rooms by the chosen one."""
    for node in (cluster.prefill, cluster.decode):
        info = node.server_info()
        assert info["transfer_backend"] == configured and chosen in info["transfer_backends"], info
        assert list(info["transfer_peers"].values()) == [chosen], info["transfer_peers"]
        metrics = httpx.get(f"{node.url}/metrics", timeout=10.0).text
        line = f'pd_node_transfer_rooms_by_backend{{backend="{chosen}",state="succeeded"}}'
        assert any(m.startswith(line) and float(m.split()[-1]) > 0 for m in metrics.splitlines()), node.role


def _check_equal_outputs(cluster: Cluster, colocated: NodeProcess) -> None:
    async def main() -> None:
        async with httpx.AsyncClient(timeout=120) as client:
            expected = await asyncio.gather(
                *(client.post(colocated.url + "/v1/completions", json=_body(p)) for p in PROMPTS)
            )
            got = await asyncio.gather(*(
                pd_request(client, cluster.prefill.url, cluster.decode.url, "/v1/completions", _body(p),
                           cluster.prefill.node_id, cluster.decode.node_id)
                for p in PROMPTS
            ))
            for ref, (p_resp, d_resp) in zip(expected, got):
                assert p_resp.status_code == 200, p_resp.text
                assert d_resp.status_code == 200, d_resp.text
                assert d_resp.json()["choices"][0]["text"] == ref.json()["choices"][0]["text"]
                assert d_resp.json()["usage"] == ref.json()["usage"]
                assert p_resp.json()["room"] >= 0 and "timings" in p_resp.json()
            # streamed: the same text
            pd = {"room": 77 + len(PROMPTS), "prefill": cluster.prefill.node_id, "decode": cluster.decode.node_id}
            body = {**_body(PROMPTS[3], stream=True), "pd": pd}
            async with client.stream("POST", cluster.decode.url + "/v1/completions", json=body) as stream:
                p_task = asyncio.ensure_future(client.post(cluster.prefill.url + "/v1/completions", json=body))
                lines = [line async for line in stream.aiter_lines() if line]
            assert (await p_task).status_code == 200
            assert _stream_text(lines) == expected[3].json()["choices"][0]["text"]

    asyncio.run(main())
    _assert_no_leak(cluster.prefill, cluster.decode)


def test_client_disconnect_during_decode_frees_both_nodes(cluster: Cluster) -> None:
    async def main() -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            pd = {"room": 4242, "prefill": cluster.prefill.node_id, "decode": cluster.decode.node_id}
            body = {**_body(PROMPTS[4], stream=True, max_tokens=1000), "pd": pd}
            p_task = asyncio.ensure_future(client.post(cluster.prefill.url + "/v1/completions", json=body))
            async with client.stream("POST", cluster.decode.url + "/v1/completions", json=body) as stream:
                n = 0
                async for line in stream.aiter_lines():
                    n += bool(line)
                    if n >= 3:
                        break
            await p_task

    asyncio.run(main())
    _assert_no_leak(cluster.prefill, cluster.decode)


def test_shared_prefix_transfers_fewer_pages(cluster: Cluster) -> None:
    shared = "the prefill node sends a page of keys to the decode node " * 8  # well over 4 pages

    def received() -> tuple[int, int]:
        s = cluster.decode.server_info()["stats"]
        return s["kv_pages_received"], s["kv_pages_reused"]

    async def one(prompt: str) -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            p, d = await pd_request(client, cluster.prefill.url, cluster.decode.url, "/v1/completions",
                                    _body(prompt), cluster.prefill.node_id, cluster.decode.node_id)
            assert p.status_code == 200 and d.status_code == 200, (p.text, d.text)

    start = received()
    asyncio.run(one(shared + "first"))
    after_first = received()
    asyncio.run(one(shared + "second"))
    after_second = received()
    first = after_first[0] - start[0]
    second = after_second[0] - after_first[0]
    assert second < first, (first, second)
    assert after_second[1] - after_first[1] >= 4  # pages the decode node found in its own cache
    _assert_no_leak(cluster.prefill, cluster.decode)


def test_incompatible_decode_node_is_refused_with_the_field(cluster: Cluster) -> None:
    node = RoleProcess("decode", cluster.bootstrap.url, [*NODE_ARGS, "--page-size", "8"], wait=False)
    try:
        deadline = time.monotonic() + 180
        while node.popen.poll() is None:
            assert time.monotonic() < deadline, "an incompatible decode node kept running"
            time.sleep(0.5)
        assert node.popen.returncode != 0
        assert "page_size" in node.log_text()
    finally:
        node.stop()


def test_pd_errors_are_openai_shaped(cluster: Cluster) -> None:
    with httpx.Client(timeout=30) as client:
        r = client.post(cluster.prefill.url + "/v1/completions", json=_body("hello"))
        assert r.status_code == 400 and r.json()["error"]["param"] == "pd"
        pd = {"room": 1, "prefill": "no-such-node", "decode": cluster.decode.node_id}
        r = client.post(cluster.decode.url + "/v1/completions", json={**_body("hello"), "pd": pd})
        assert r.status_code == 503 and "no-such-node" in r.json()["error"]["message"]
        assert r.json()["error"]["code"] == "prefill_unreachable"  # the frontend retries without that node
    _assert_no_leak(cluster.prefill, cluster.decode)


def _kill(node: RoleProcess) -> None:
    os.killpg(node.popen.pid, signal.SIGKILL)
    node.popen.wait(timeout=10)


def test_node_deaths_fail_rooms_cleanly(cluster: Cluster) -> None:
    """Last in the module: it kills the shared cluster's nodes."""
    c = cluster

    async def main() -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            # decode waits on a room whose prefill request never comes, then the prefill node dies
            pd = {"room": 9001, "prefill": c.prefill.node_id, "decode": c.decode.node_id}
            d_task = asyncio.ensure_future(client.post(c.decode.url + "/v1/completions",
                                                       json={**_body(PROMPTS[2]), "pd": pd}))
            await asyncio.sleep(1.0)
            _kill(c.prefill)
            started = time.monotonic()
            d_resp = await d_task
            assert d_resp.status_code >= 500 or d_resp.status_code == 409, d_resp.text
            assert "error" in d_resp.json()
            assert time.monotonic() - started < 30
        _assert_no_leak(c.decode)

    asyncio.run(main())

    # the prefill node restarts under its node id, with a new transfer port; the decode node's cached
    # record still names the old port: the first request is refused as the prefill node's fault (the
    # code the frontend blames that node by), the next one looks the node up again and succeeds
    c.prefill = RoleProcess("prefill", c.bootstrap.url, NODE_ARGS, node_id=c.prefill.node_id)
    c.children.append(c.prefill)

    async def restarted() -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            pd = {"room": 9003, "prefill": c.prefill.node_id, "decode": c.decode.node_id}
            r = await client.post(c.decode.url + "/v1/completions", json={**_body(PROMPTS[2]), "pd": pd})
            assert r.status_code == 503, r.text
            error = r.json()["error"]
            assert error["code"] == "prefill_unreachable" and c.prefill.node_id in error["message"], error
            p, d = await pd_request(client, c.prefill.url, c.decode.url, "/v1/completions", _body(PROMPTS[2]),
                                    c.prefill.node_id, c.decode.node_id)
            assert p.status_code == 200 and d.status_code == 200, (p.text, d.text)

    asyncio.run(restarted())
    _assert_no_leak(c.decode)

    # then the decode node dies: the prefill's room, never admitted, ends at the queue timeout and frees
    # its state (behind a frontend it ends sooner: the frontend cancels the prefill request)
    _kill(c.decode)

    async def orphan() -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            pd = {"room": 9002, "prefill": c.prefill.node_id, "decode": c.decode.node_id}
            r = await client.post(c.prefill.url + "/v1/completions", json={**_body(PROMPTS[2]), "pd": pd})
            assert r.status_code >= 400 and "error" in r.json()

    asyncio.run(orphan())
    _assert_no_leak(c.prefill)
