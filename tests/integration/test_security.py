"""The cluster token, on real processes: bootstrap, a prefill and a decode node and a frontend, all
holding the same `--cluster-token-file`. A process without the token can neither register nor list
nodes (a), nor receive KV through the real transfer layer (b), nor reach a node's pd plane (c); the
frontend holding it serves end to end (d); and the token appears in no log, /server_info, /nodes or
--print-config.
"""

from __future__ import annotations

import concurrent.futures
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from frontend_helpers import FrontendProcess
from pd_cluster import RoleProcess

from pd_serve.bootstrap.process import BootstrapProcess, ChildProcess
from pd_serve.cli import main
from pd_serve.transfer import RoomState, TransferConfig, TransferEngine

TOKEN = "cluster-" + secrets.token_urlsafe(24)
WAIT_S = 3.0  # --transfer-bootstrap-timeout: how long the prefill node waits for a room's receiver
CHAT = {"model": "demo", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 4}
REGISTRATION = {
    "role": "prefill", "http_url": "http://127.0.0.1:1", "transfer": [{"backend": "tcp", "address": "127.0.0.1:2"}],
    "layout": {"architecture": "x", "num_layers": 1, "num_kv_heads": 1, "head_dim": 8, "dtype": "float32",
               "page_size": 16, "config_hash": "h"},
    "capacity": {"total_pages": 8, "max_running_requests": 1},
}


class SecureCluster:
    def __init__(self, token_file: Path) -> None:
        secret = ["--cluster-token-file", str(token_file)]
        self.bootstrap = BootstrapProcess(args=["--node-ttl", "5", *secret])
        self.children: list[ChildProcess] = [self.bootstrap]
        try:
            node_args = [*secret, "--transfer-bootstrap-timeout", str(WAIT_S), "--queue-timeout", str(WAIT_S),
                         "--log-level", "info"]
            self.prefill = RoleProcess("prefill", self.bootstrap.url, node_args, wait=False)
            self.children.append(self.prefill)
            self.decode = RoleProcess("decode", self.bootstrap.url, node_args, wait=False)
            self.children.append(self.decode)
            self.frontend = FrontendProcess(["--bootstrap", self.bootstrap.url, *secret], wait=False)
            self.children.append(self.frontend)
            for child in (self.prefill, self.decode, self.frontend):
                child.wait()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for child in reversed(self.children):  # their logs are read already: no graceful drain needed
            child.stop(graceful=False)


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secret") / "cluster.token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def cluster(token_file: Path) -> Iterator[SecureCluster]:
    c = SecureCluster(token_file)
    yield c
    logs = {type(child).__name__ + str(child.argv[3:5]): child.log_text() for child in c.children}
    c.stop()
    for name, text in logs.items():  # 4. the token is in no log line of any process
        assert TOKEN not in text, f"the cluster token appears in the log of {name}"


def _info(node: RoleProcess) -> dict[str, Any]:
    return node.server_info()


def test_a_bootstrap_refuses_a_process_without_the_token(cluster: SecureCluster) -> None:
    url = cluster.bootstrap.url
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        put = httpx.put(f"{url}/v1/nodes/intruder-0", json=REGISTRATION, headers=headers, timeout=10)
        listing = httpx.get(f"{url}/v1/nodes", headers=headers, timeout=10)
        assert put.status_code == listing.status_code == 401
        assert "cluster token" in put.json()["detail"] and TOKEN not in put.text + listing.text
    nodes = httpx.get(f"{url}/v1/nodes", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).json()["nodes"]
    assert sorted(n["node_id"] for n in nodes) == sorted([cluster.prefill.node_id, cluster.decode.node_id])


def test_b_a_receiver_without_the_token_gets_no_kv(cluster: SecureCluster) -> None:
    info = _info(cluster.prefill)
    layout, endpoint = info["layout"], info["transfer_endpoint"]
    sent_before, pages_before = info["stats"]["transfer"].get("sent_bytes", 0), info["stats"]["kv_pages_sent"]
    shape = (4, layout["page_size"], layout["num_kv_heads"], layout["head_dim"])
    dtype = getattr(torch, layout["dtype"])
    room = secrets.randbits(63)
    body = {**CHAT, "pd": {"room": room, "prefill": cluster.prefill.node_id, "decode": cluster.decode.node_id}}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        # the frontend's half of a real room: the prefill node now waits for the room's receiver
        answer = pool.submit(httpx.post, f"{cluster.prefill.url}/v1/chat/completions", json=body,
                             headers={"X-PD-Cluster-Token": TOKEN}, timeout=60)
        for token in (None, "wrong-token"):
            pools = [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for _ in range(layout["num_layers"])]
            config = TransferConfig(backend="tcp", token=token, bootstrap_timeout=WAIT_S, connect_timeout=WAIT_S)
            with TransferEngine(config, pools, layout) as thief:
                rx = thief.receiver(room, endpoint, [0, 1, 2, 3], expected_tokens=4, prompt_hash="h")
                deadline = time.monotonic() + 30
                while rx.poll() not in (RoomState.SUCCESS, RoomState.FAILED) and time.monotonic() < deadline:
                    time.sleep(0.02)
                assert rx.poll() is RoomState.FAILED and "cluster token does not match" in (rx.failure_reason or "")
                assert all(not k.any() and not v.any() for k, v in pools), "KV landed in a thief's pages"
        refused = answer.result(timeout=60)
    assert refused.status_code == 502 and "timed out" in refused.json()["error"]["message"]  # no receiver ever bound
    after = _info(cluster.prefill)["stats"]
    assert after["transfer"].get("sent_bytes", 0) == sent_before and after["kv_pages_sent"] == pages_before


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_c_pd_requests_need_the_token(cluster: SecureCluster, role: str) -> None:
    node: RoleProcess = getattr(cluster, role)
    pd = {"room": secrets.randbits(63), "prefill": cluster.prefill.node_id, "decode": cluster.decode.node_id}
    wrong = ({}, 401), ({"X-PD-Cluster-Token": "wrong"}, 403), ({"Authorization": "Bearer wrong"}, 403)
    for headers, status in wrong:
        r = httpx.post(f"{node.url}/v1/chat/completions", json={**CHAT, "pd": pd}, headers=headers, timeout=30)
        assert r.status_code == status and r.json()["error"]["param"] == "pd"
        assert "X-PD-Cluster-Token" in r.json()["error"]["message"]
        flush = httpx.post(f"{node.url}/flush_cache", headers=headers, timeout=30)
        assert flush.status_code == status
    # the token as a bearer (how smg sends a worker's --api-key) opens the internal routes too
    assert httpx.post(f"{node.url}/flush_cache", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30).status_code == 200
    idle = _info(node)["idle"]
    assert idle["rooms"] == idle["engine_requests"] == idle["transfer_live_receivers"] == idle["transfer_live_senders"] == 0
    assert idle["transfer_pending_room_requests"] == 0 and idle["pages_free"] == idle["pages_total"]
    if role == "decode":  # a plain request (no pd) stays open to clients: the API key's business
        plain = httpx.post(f"{node.url}/v1/chat/completions", json=CHAT, timeout=120)
        assert plain.status_code == 200, plain.text


def test_d_the_frontend_with_the_token_serves_end_to_end(cluster: SecureCluster, token_file: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    r = httpx.post(f"{cluster.frontend.url}/v1/chat/completions", json=CHAT, timeout=120)
    assert r.status_code == 200, r.text
    assert r.headers["x-pd-prefill"] == cluster.prefill.node_id and r.json()["choices"][0]["message"]["content"]
    nodes = httpx.get(f"{cluster.frontend.url}/nodes", timeout=10)
    assert TOKEN not in nodes.text and nodes.json()["admission"] == {"in_flight": 0, "by_key": {}}
    for node in (cluster.prefill, cluster.decode):
        info = _info(node)
        assert info["server_config"]["cluster_token_set"] is True and TOKEN not in str(info)
    argv = {"bootstrap": [], "prefill": ["--model", "demo"], "frontend": ["--bootstrap", "http://b:1"]}
    for role, extra in argv.items():
        assert main([role, *extra, "--cluster-token-file", str(token_file), "--print-config"]) == 0
        assert TOKEN not in capsys.readouterr().out
