"""`pd-serve up` end to end with the demo model: 1 prefill + 1 decode node behind the frontend.

The cluster is started once for the module through the real command, as a user would, beside one
`pd-serve colocated` node whose greedy output the disaggregated path must equal. Covered here: the
ready line, the official openai client (chat, streamed and not), HTTP/2 with prior knowledge and
HTTP/1.1, the API key and OpenAI-shaped 4xx bodies, static mode (a second frontend started with
`--prefill/--decode URL` lists in front of the same nodes: the decode node finds its peer through
`pd.prefill_url`), SIGTERM of `up` leaving no process of its tree behind, and, once it is gone, that
`--log-format json` reached every child: each line of each child's log is a JSON object of its role.
The 2P2D cluster (spreading, kill -9 of a prefill node, no compatible pair) is test_frontend_cluster.py.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from frontend_helpers import FrontendProcess, UpProcess, descendants, greedy_chat, metric_value
from server_helpers import NodeProcess, pid_alive, wait_until

from pd_serve.cli import SUBCOMMANDS

pytestmark = pytest.mark.skipif(
    "decode" not in SUBCOMMANDS, reason="pd-serve prefill/decode are not registered in pd_serve/cli.py yet"
)
KEY = "up-key"
HDRS = {"Authorization": f"Bearer {KEY}"}
PROMPTS = ("the scheduler moves pages", "a longer prompt " * 12)


@pytest.fixture(scope="module")
def both() -> Iterator[tuple[UpProcess, NodeProcess]]:
    """The cluster and the colocated node, started side by side (each waits on torch imports)."""
    cluster = UpProcess(
        ["--model", "demo", "--num-prefill", "1", "--num-decode", "1", "--log-format", "json"],  # backend: auto
        KEY,
    )
    try:
        node = NodeProcess()
    except BaseException:
        cluster.kill()
        raise
    try:
        cluster.wait_ready()
        yield cluster, node
    finally:
        node.stop()
        cluster.kill()


@pytest.fixture(scope="module")
def up(both: tuple[UpProcess, NodeProcess]) -> UpProcess:
    return both[0]


@pytest.fixture(scope="module")
def colocated(both: tuple[UpProcess, NodeProcess]) -> NodeProcess:
    return both[1]


def _chat(content: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": "demo",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 8,
        "temperature": 0,
        "ignore_eos": True,
        **extra,
    }


def _post(url: str, body: Any, headers: dict[str, str] = HDRS) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=120)


def test_up_prints_the_url_and_a_curl_example(up: UpProcess) -> None:
    assert up.ready_line_matches("1 prefill, 1 decode") and "curl " in up.output()
    nodes = httpx.get(f"{up.url}/nodes", headers=HDRS, timeout=30).json()["nodes"]
    assert sorted(n["role"] for n in nodes) == ["decode", "prefill"]


@pytest.mark.parametrize("stream", [False, True])
def test_disaggregated_greedy_output_equals_colocated(
    up: UpProcess, colocated: NodeProcess, stream: bool
) -> None:
    through = openai.OpenAI(base_url=f"{up.url}/v1", api_key=KEY, max_retries=0, timeout=120)
    direct = openai.OpenAI(base_url=f"{colocated.url}/v1", api_key="none", max_retries=0, timeout=120)
    for content in PROMPTS:
        assert greedy_chat(through, content, stream) == greedy_chat(direct, content, stream)


def test_http2_and_http1_through_the_frontend(up: UpProcess) -> None:
    for http1, http2, version in ((False, True, "HTTP/2"), (True, False, "HTTP/1.1")):
        with httpx.Client(http1=http1, http2=http2, headers=HDRS, timeout=120) as c:
            r = c.post(f"{up.url}/v1/chat/completions", json=_chat("which protocol", stream=True))
        assert r.status_code == 200 and r.http_version == version, r.text
        assert r.text.endswith("data: [DONE]\n\n") and r.headers["x-pd-prefill"] == "prefill-0"


def test_api_key_and_openai_shaped_errors(up: UpProcess) -> None:
    url = up.url
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = _post(url, _chat("no key"), headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
    assert httpx.get(f"{url}/nodes", timeout=30).status_code == 401
    r = httpx.post(f"{url}/v1/chat/completions", content=b"{not json", headers=HDRS, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
    r = _post(url, [1, 2])
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
    r = _post(url, {**_chat("client pd"), "pd": {"room": 1}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "pd", r.text
    r = _post(url, _chat("stream", stream="yes"))
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream", r.text
    r = httpx.get(f"{url}/v1/chat/completions", headers=HDRS, timeout=30)
    assert r.status_code == 405 and "error" in r.json()
    r = httpx.get(f"{url}/nope", headers=HDRS, timeout=30)
    assert r.status_code == 404 and "error" in r.json()
    # a node's own validation error comes back as it is (a client error: not retried)
    retries = metric_value(httpx.get(f"{url}/metrics", timeout=30).text, "pd_frontend_retries_total")
    r = _post(url, _chat("bad", max_tokens=-1))
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
    r = _post(url, _chat("bad", temperature="hot"))
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
    after = metric_value(httpx.get(f"{url}/metrics", timeout=30).text, "pd_frontend_retries_total")
    assert after == retries
    assert httpx.get(f"{url}/health", timeout=30).status_code == 200  # open routes need no key
    assert httpx.get(f"{url}/v1/models", headers=HDRS, timeout=30).json()["data"][0]["id"] == "demo"


def test_static_mode_sends_prefill_url(up: UpProcess, colocated: NodeProcess) -> None:
    nodes = {
        n["role"]: n["url"] for n in httpx.get(f"{up.url}/nodes", headers=HDRS, timeout=30).json()["nodes"]
    }
    static = FrontendProcess(
        ["--prefill", nodes["prefill"], "--decode", nodes["decode"], "--probe-interval", "0.5"], env=up.env
    )
    try:
        body = _chat(PROMPTS[0], max_tokens=12)
        r = _post(static.url, body, headers={})
        # node ids are URLs here, unknown to bootstrap: the decode node found its peer through pd.prefill_url
        assert r.status_code == 200, r.text
        assert r.headers["x-pd-prefill"] == nodes["prefill"] and r.headers["x-pd-decode"] == nodes["decode"]
        want = httpx.post(f"{colocated.url}/v1/chat/completions", json=body, timeout=120).json()
        assert r.json()["choices"][0]["message"]["content"] == want["choices"][0]["message"]["content"]
    finally:
        static.stop()


def test_sigterm_stops_every_child(up: UpProcess) -> None:
    """Last: the cluster is gone afterwards."""
    tree = descendants(up.popen.pid)
    assert len(tree) >= 4  # bootstrap, prefill, decode, frontend (and their workers and engines)
    up.popen.send_signal(signal.SIGTERM)
    assert up.popen.wait(60) == 0
    wait_until(lambda: not any(pid_alive(p) for p in tree), 30, "every process of the up tree exits")


def test_every_child_logged_json_without_secrets(up: UpProcess) -> None:
    """After the SIGTERM above, so shutdown lines are in the logs too."""
    token = up.env["PD_SERVE_CLUSTER_TOKEN"]
    logs = {p.stem: p.read_text(errors="replace") for p in Path(up.log_dir).glob("*.log")}
    assert set(logs) == {"bootstrap", "prefill-0", "decode-0", "frontend"}
    for name, text in logs.items():
        role = name.split("-")[0]
        records = [json.loads(line) for line in text.splitlines()]  # a line that is not JSON fails here
        roles = {r["role"] for r in records}
        assert roles <= {role, f"{role}/engine"} and role in roles, (name, roles)
        if role in ("prefill", "decode"):
            assert f"{role}/engine" in roles, name  # the engine process inherited the format
        assert token not in text and KEY not in text, name
