"""Whole-service behaviour of `pd-serve bootstrap`: auth, --max-nodes, Redis restarts and replicas."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from bootstrap_helpers import clear_nodes, registration, start_redis

from pd_serve.bootstrap.client import BootstrapClient, Unauthorized
from pd_serve.bootstrap.config import TOKEN_ENV
from pd_serve.bootstrap.process import BootstrapProcess, RedisProcess

pytestmark = pytest.mark.timeout(120)
TOKEN = "s3cret-token-that-must-never-be-logged"


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisProcess]:
    proc = start_redis()
    yield proc
    proc.stop(graceful=False)


@pytest.fixture(scope="module", params=["file", "env"])
def secured(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BootstrapProcess]:
    """A service with a token (from a file, or from the environment) and --max-nodes 2."""
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    args = ["--max-nodes", "2", "--log-level", "debug"]
    if request.param == "file":
        token_file = tmp_path_factory.mktemp("auth") / "token"
        token_file.write_text(TOKEN + "\n")
        args += ["--cluster-token-file", str(token_file)]
    else:
        env[TOKEN_ENV] = TOKEN
    proc = BootstrapProcess(args=args, env=env)
    yield proc
    proc.stop()


GOOD = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def authed(secured: BootstrapProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=secured.url, timeout=10.0, headers=GOOD) as http:
        clear_nodes(http)
        yield http


def test_auth_is_required_and_wrong_tokens_are_refused(
    secured: BootstrapProcess, authed: httpx.Client
) -> None:
    with httpx.Client(base_url=secured.url, timeout=10.0) as http:
        assert http.get("/health").status_code == 200  # the one open route
        for method, path in [
            ("GET", "/v1/nodes"),
            ("GET", "/metrics"),
            ("PUT", "/v1/nodes/p0"),
            ("GET", "/v1/pairs/check?prefill=a&decode=b"),
        ]:
            refused = http.request(method, path, json=registration())
            assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
            assert TOKEN not in refused.text
        for wrong in ("Bearer nope", f"Basic {TOKEN}", f"Bearer {TOKEN}x"):
            assert http.get("/v1/nodes", headers={"Authorization": wrong}).status_code == 401
        assert authed.put("/v1/nodes/p0", json=registration()).status_code == 201
        assert authed.get("/v1/nodes").json()["nodes"][0]["node_id"] == "p0"
    assert asyncio.run(_client_calls(secured.url)) == (["p0"], "Unauthorized")
    assert TOKEN not in secured.log_text()


async def _client_calls(url: str) -> tuple[list[str], str]:
    async with BootstrapClient(url, token=TOKEN) as client:
        names = [n.node_id for n in (await client.list_nodes()).nodes]
    async with BootstrapClient(url, token="wrong") as client:
        try:
            await client.list_nodes()
        except Unauthorized as exc:
            return names, type(exc).__name__
    return names, "accepted"


def test_max_nodes_refuses_joins_but_not_refreshes(authed: httpx.Client) -> None:
    assert authed.put("/v1/nodes/a", json=registration()).status_code == 201
    assert authed.put("/v1/nodes/b", json=registration()).status_code == 201
    full = authed.put("/v1/nodes/c", json=registration())
    assert full.status_code == 507 and "--max-nodes 2" in full.json()["detail"]
    assert authed.put("/v1/nodes/a", json=registration()).status_code == 200
    assert authed.delete("/v1/nodes/b").status_code == 204
    assert authed.put("/v1/nodes/c", json=registration()).status_code == 201


def test_a_busy_port_is_refused(secured: BootstrapProcess) -> None:
    second = subprocess.run(
        [sys.executable, "-m", "pd_serve.cli", "bootstrap", "--port", str(secured.port)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 2 and "--port" in second.stderr  # no silent second registry


def _replica(redis: RedisProcess, prefix: str) -> BootstrapProcess:
    args = ["--store", redis.url, "--redis-prefix", prefix, "--node-ttl", "30", "--log-level", "warning"]
    return BootstrapProcess(args=args)


def test_restart_with_redis_keeps_all_nodes(redis: RedisProcess) -> None:
    first = _replica(redis, "restart")
    try:
        with httpx.Client(base_url=first.url, timeout=10.0) as http:
            for node_id, role in [("p0", "prefill"), ("p1", "prefill"), ("d0", "decode")]:
                assert http.put(f"/v1/nodes/{node_id}", json=registration(role=role)).status_code == 201
            before = http.get("/v1/nodes").json()
    finally:
        first.stop(graceful=False)  # a crash, not a clean shutdown
    second = _replica(redis, "restart")
    try:
        with httpx.Client(base_url=second.url, timeout=10.0) as http:
            after = http.get("/v1/nodes").json()
            assert after == before
            assert http.post("/v1/nodes/d0/heartbeat").status_code == 200
    finally:
        second.stop()


def test_two_replicas_on_one_redis_agree(redis: RedisProcess) -> None:
    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(lambda _: _replica(redis, "replicas"), range(2))
    try:
        with (
            httpx.Client(base_url=a.url, timeout=20.0) as via_a,
            httpx.Client(base_url=b.url, timeout=20.0) as via_b,
        ):
            assert via_a.put("/v1/nodes/p0", json=registration()).status_code == 201
            assert via_b.get("/v1/nodes").json() == via_a.get("/v1/nodes").json()
            etag = via_b.get("/v1/nodes").json()["etag"]
            with ThreadPoolExecutor(1) as pool:
                waiting = pool.submit(via_b.get, "/v1/nodes", params={"wait": etag, "timeout": 15})
                assert via_a.put("/v1/nodes/d0", json=registration(role="decode")).status_code == 201
                woken = waiting.result(timeout=20).json()
            assert [n["node_id"] for n in woken["nodes"]] == ["d0", "p0"]  # B saw A's join
            assert via_b.delete("/v1/nodes/p0").status_code == 204
            assert via_a.get("/v1/nodes/p0").status_code == 404
            check = via_b.get("/v1/pairs/check", params={"prefill": "d0", "decode": "d0"}).json()
            assert check == via_a.get("/v1/pairs/check", params={"prefill": "d0", "decode": "d0"}).json()
    finally:
        a.stop()
        b.stop()
