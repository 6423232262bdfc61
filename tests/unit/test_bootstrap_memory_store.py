"""Unit tests of the memory store with a fake clock: TTL, refresh, expiry hook and --max-nodes."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pd_serve.bootstrap.memory_store import MemoryStore
from pd_serve.bootstrap.records import Load, NodeRegistration
from pd_serve.bootstrap.store import NodeNotFound, StoreFull

REG = NodeRegistration.model_validate(
    {
        "role": "decode",
        "http_url": "http://127.0.0.1:9002",
        "transfer": [{"backend": "tcp", "address": "127.0.0.1:17001"}],
        "layout": {
            "architecture": "A",
            "num_layers": 1,
            "num_kv_heads": 1,
            "head_dim": 4,
            "dtype": "float32",
            "page_size": 4,
            "config_hash": "h",
        },
        "capacity": {"total_pages": 8, "max_running_requests": 2},
    }
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(max_nodes: int = 10) -> tuple[MemoryStore, Clock, list[str]]:
    clock, expired = Clock(), []
    return MemoryStore(5.0, max_nodes, expired.append, clock=clock), clock, expired


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_put_then_refresh_keeps_registered_at() -> None:
    store, clock, _ = make()
    first = run(store.put("d0", REG))
    assert first.created and first.record.expires_at == 1005.0
    clock.now += 2
    again = run(store.put("d0", REG.model_copy(update={"load": Load(running=1)})))
    assert not again.created
    assert again.record.registered_at == 1000.0 and again.record.expires_at == 1007.0


def test_heartbeat_extends_and_expiry_removes_once() -> None:
    store, clock, expired = make()
    run(store.put("d0", REG))
    clock.now += 4
    assert run(store.heartbeat("d0", Load(waiting=3))).expires_at == 1009.0
    clock.now += 4.9
    assert run(store.get("d0")) is not None
    clock.now += 0.2
    assert run(store.list()) == []
    assert run(store.get("d0")) is None
    with pytest.raises(NodeNotFound):
        run(store.heartbeat("d0", None))
    assert expired == ["d0"]


def test_reregistering_after_expiry_is_a_new_registration() -> None:
    store, clock, _ = make()
    run(store.put("d0", REG))
    clock.now += 6
    result = run(store.put("d0", REG))
    assert result.created and result.record.registered_at == 1006.0


def test_max_nodes_counts_only_live_nodes() -> None:
    store, clock, _ = make(max_nodes=2)
    run(store.put("a", REG))
    run(store.put("b", REG))
    with pytest.raises(StoreFull, match="--max-nodes 2"):
        run(store.put("c", REG))
    assert not run(store.put("a", REG)).created  # a refresh is always allowed
    clock.now += 10
    assert run(store.put("c", REG)).created  # the expired ones made room


def test_delete_and_list_order() -> None:
    store, _, expired = make()
    for node_id in ("b", "a", "c"):
        run(store.put(node_id, REG))
    assert [r.node_id for r in run(store.list())] == ["a", "b", "c"]
    assert run(store.delete("b")) and not run(store.delete("b"))
    assert [r.node_id for r in run(store.list())] == ["a", "c"]
    assert expired == []
