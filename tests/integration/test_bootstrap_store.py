"""The bootstrap HTTP API against each store: one real `pd-serve bootstrap` process per store.

The same tests run with `--store memory` and with `--store redis://...` on a redis-server started
here. Each test starts from an empty registry (nodes of the previous test are deleted).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from bootstrap_helpers import TTL, clear_nodes, registration, start_redis, wait_until

from pd_serve.bootstrap.process import BootstrapProcess

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module", params=["memory", "redis"])
def service(request: pytest.FixtureRequest) -> Iterator[BootstrapProcess]:
    redis = start_redis() if request.param == "redis" else None
    store = redis.url if redis is not None else "memory"
    try:
        proc = BootstrapProcess(args=["--store", store, "--node-ttl", str(TTL), "--log-level", "warning"])
    except BaseException:
        if redis is not None:
            redis.stop()
        raise
    yield proc
    proc.stop()
    if redis is not None:
        redis.stop(graceful=False)


@pytest.fixture(scope="module")
def shared_client(service: BootstrapProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.url, timeout=20.0) as client:  # one client: each costs an SSL context
        yield client


@pytest.fixture
def http(shared_client: httpx.Client) -> httpx.Client:
    clear_nodes(shared_client)
    return shared_client


def put(http: httpx.Client, node_id: str, **kwargs: object) -> httpx.Response:
    return http.put(f"/v1/nodes/{node_id}", json=registration(**kwargs))  # type: ignore[arg-type]


def test_health_names_the_store(http: httpx.Client, service: BootstrapProcess) -> None:
    body = http.get("/health").json()
    assert body == {"status": "ok", "store": "memory" if "memory" in service.argv else "redis"}


def test_register_get_and_list_by_role(http: httpx.Client) -> None:
    created = put(http, "p0", role="prefill")
    assert created.status_code == 201
    record = created.json()
    assert record["node_id"] == "p0" and record["layout"]["page_size"] == 16
    assert record["expires_at"] == pytest.approx(record["updated_at"] + TTL)
    assert put(http, "d0", role="decode").status_code == 201

    prefill = http.get("/v1/nodes", params={"role": "prefill"})
    assert [n["node_id"] for n in prefill.json()["nodes"]] == ["p0"]
    assert prefill.headers["etag"] == f'"{prefill.json()["etag"]}"'
    assert [n["node_id"] for n in http.get("/v1/nodes").json()["nodes"]] == ["d0", "p0"]
    assert http.get("/v1/nodes/d0").json()["role"] == "decode"
    assert http.get("/v1/nodes/nobody").status_code == 404


def test_refresh_keeps_registration_and_etag(http: httpx.Client) -> None:
    first = put(http, "p0").json()
    etag = http.get("/v1/nodes").json()["etag"]
    again = put(http, "p0", load={"running": 3, "waiting": 1, "free_pages": 100})
    assert again.status_code == 200
    assert again.json()["registered_at"] == first["registered_at"]
    assert again.json()["load"]["running"] == 3
    assert http.get("/v1/nodes").json()["etag"] == etag
    changed = put(http, "p0", page_size=32)
    assert changed.status_code == 201
    assert http.get("/v1/nodes").json()["etag"] != etag


def test_heartbeat_extends_ttl_and_updates_load(http: httpx.Client) -> None:
    record = put(http, "d0", role="decode").json()
    assert http.get("/v1/nodes").json()["nodes"][0]["load"]["running"] == 0
    beat = http.post("/v1/nodes/d0/heartbeat", json={"load": {"running": 5, "waiting": 2, "free_pages": 7, "queued": 3}})
    assert beat.status_code == 200
    assert beat.json()["expires_at"] > record["expires_at"]
    assert beat.json()["load"] == {"running": 5, "waiting": 2, "free_pages": 7, "queued": 3}
    older = http.post("/v1/nodes/d0/heartbeat", json={"load": {"running": 5, "waiting": 2, "free_pages": 7}})
    assert older.json()["load"]["queued"] == 0  # a node from before `queued` still heartbeats
    assert http.post("/v1/nodes/d0/heartbeat").status_code == 200
    assert http.get("/v1/nodes/d0").json()["load"]["running"] == 5
    assert http.get("/v1/nodes").json()["nodes"][0]["load"]["running"] == 5  # no stale parsed copy
    assert http.post("/v1/nodes/ghost/heartbeat").status_code == 404


def test_delete_is_a_graceful_leave(http: httpx.Client) -> None:
    put(http, "p0")
    assert http.delete("/v1/nodes/p0").status_code == 204
    assert http.get("/v1/nodes/p0").status_code == 404
    assert http.delete("/v1/nodes/p0").status_code == 404
    assert http.get("/v1/nodes").json()["nodes"] == []


def _long_poll(http: httpx.Client, etag: str, timeout: float, role: str | None = None) -> dict:
    params: dict[str, object] = {"wait": etag, "timeout": timeout}
    if role is not None:
        params["role"] = role
    return http.get("/v1/nodes", params=params).json()  # type: ignore[arg-type]


def test_long_poll_wakes_on_join(http: httpx.Client) -> None:
    etag = http.get("/v1/nodes").json()["etag"]
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(_long_poll, http, etag, 15.0)
        put(http, "d0", role="decode")
        answer = waiting.result(timeout=20)
    # woken by the join: a timeout would have answered with the old, empty list
    assert [n["node_id"] for n in answer["nodes"]] == ["d0"]
    assert answer["etag"] != etag


def test_node_expires_after_ttl_waking_long_polls(http: httpx.Client) -> None:
    put(http, "p0")
    put(http, "d0", role="decode")
    etag = http.get("/v1/nodes", params={"role": "prefill"}).json()["etag"]
    answer = _long_poll(http, etag, timeout=TTL + 10, role="prefill")
    assert answer["nodes"] == [] and answer["etag"] != etag  # woken by the expiry, not the timeout
    wait_until(lambda: http.get("/v1/nodes").json()["nodes"] == [], timeout=TTL + 8, what="expiry of d0")
    assert http.get("/v1/nodes/p0").status_code == 404
    assert http.post("/v1/nodes/p0/heartbeat").status_code == 404
    assert http.get("/v1/pairs/check", params={"prefill": "p0", "decode": "d0"}).status_code == 404
    metrics = http.get("/metrics").text
    assert 'pd_bootstrap_nodes{role="prefill"} 0.0' in metrics
    assert "pd_bootstrap_expiries_total 0.0" not in metrics


def test_long_poll_times_out_unchanged_and_filters_by_role(http: httpx.Client) -> None:
    etag = http.get("/v1/nodes", params={"role": "decode"}).json()["etag"]
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(_long_poll, http, etag, 0.5, "decode")
        put(http, "p0", role="prefill")  # another role: the decode watcher must not see it
        answer = waiting.result(timeout=20)
    assert answer == {"nodes": [], "etag": etag}
    assert _long_poll(http, "stale", timeout=5.0)["nodes"][0]["node_id"] == "p0"


def test_pair_check_names_the_first_differing_field(http: httpx.Client) -> None:
    put(http, "p0", role="prefill")
    put(http, "d0", role="decode")
    put(http, "d1", role="decode", page_size=32)
    put(http, "d2", role="decode", tp=2)

    def check(p: str, d: str) -> httpx.Response:
        return http.get("/v1/pairs/check", params={"prefill": p, "decode": d})

    assert check("p0", "d0").json() == {
        "compatible": True,
        "prefill": "p0",
        "decode": "d0",
        "field": None,
        "prefill_value": None,
        "decode_value": None,
        "reason": None,
    }
    mismatch = check("p0", "d1").json()
    assert mismatch["compatible"] is False and mismatch["field"] == "layout.page_size"
    assert (mismatch["prefill_value"], mismatch["decode_value"]) == (16, 32)
    assert check("p0", "d2").json()["field"] == "tp_size"
    assert check("d0", "d0").json()["field"] == "role"
    missing = check("p0", "nope")
    assert missing.status_code == 404 and "decode node 'nope'" in missing.json()["detail"]


@pytest.mark.parametrize(
    ("node_id", "body", "field"),
    [
        ("p0", registration(layout=None), "layout"),
        ("p0", {k: v for k, v in registration().items() if k != "capacity"}, "capacity"),
        ("p0", registration(role="router"), "role"),
        ("p0", registration(http_url="ftp://x"), "http_url"),
        ("p0", registration(transfer=[]), "transfer"),
        ("p0", registration(transfer=[{"backend": "tcp"}]), "transfer.0.address"),
        ("p0", registration(load={"running": -1}), "load.running"),
        ("p0", {**registration(), "colour": "blue"}, "colour"),
        (
            "p0",
            {**registration(), "layout": {**registration()["layout"], "page_size": "16"}},
            "layout.page_size",
        ),
        ("-starts-with-dash", registration(), "node_id"),
        ("has space", registration(), "node_id"),
        ("x" * 129, registration(), "node_id"),
    ],
)
def test_malformed_input_gets_422_naming_the_field(
    http: httpx.Client, node_id: str, body: dict, field: str
) -> None:
    response = http.put(f"/v1/nodes/{node_id}", json=body)
    assert response.status_code == 422
    assert field in [e["field"] for e in response.json()["errors"]]
    assert response.json()["detail"].startswith(response.json()["errors"][0]["field"])
    assert http.get("/v1/nodes").json()["nodes"] == []


def test_other_bad_input(http: httpx.Client) -> None:
    bad_json = http.put("/v1/nodes/p0", content=b"{not json", headers={"content-type": "application/json"})
    assert bad_json.status_code == 422 and bad_json.json()["errors"][0]["field"] == "body"
    big = registration(http_url="http://h/" + "a" * 70_000)
    assert http.put("/v1/nodes/p0", json=big).status_code == 413
    assert (
        http.get("/v1/nodes", params={"timeout": 600, "wait": "x"}).json()["errors"][0]["field"] == "timeout"
    )
    assert http.get("/v1/nodes", params={"role": "router"}).status_code == 422
    put(http, "p0")
    beat = http.post("/v1/nodes/p0/heartbeat", json={"load": {"running": "many"}})
    assert beat.status_code == 422 and beat.json()["errors"][0]["field"] == "load.running"


def test_metrics_count_nodes_registrations_and_requests(http: httpx.Client) -> None:
    put(http, "p0")
    put(http, "d0", role="decode")
    put(http, "d0", role="decode")
    http.post("/v1/nodes/d0/heartbeat")
    text = http.get("/metrics").text
    assert 'pd_bootstrap_nodes{role="prefill"} 1.0' in text
    assert 'pd_bootstrap_nodes{role="decode"} 1.0' in text
    assert 'pd_bootstrap_registrations_total{kind="refresh"}' in text
    assert "pd_bootstrap_heartbeats_total" in text
    assert 'route="/v1/nodes/{node_id}",status="201"' in text
