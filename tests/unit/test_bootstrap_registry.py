"""Unit tests of the registry behind the routes: shared snapshot and long-poll wake-ups (memory store)."""

from __future__ import annotations

import asyncio

from pd_serve.bootstrap.config import BootstrapConfig
from pd_serve.bootstrap.metrics import BootstrapMetrics
from pd_serve.bootstrap.records import NodeRecord, NodeRegistration
from pd_serve.bootstrap.registry import Registry

REG = NodeRegistration.model_validate(
    {
        "role": "prefill",
        "http_url": "http://127.0.0.1:9004",
        "transfer": [{"backend": "tcp", "address": "127.0.0.1:17004"}],
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


def counting_registry() -> tuple[Registry, list[int]]:
    registry = Registry(BootstrapConfig(node_ttl=60), BootstrapMetrics())
    reads = [0]
    real_list = registry.store.list

    async def counted() -> list[NodeRecord]:
        reads[0] += 1
        return await real_list()

    registry.store.list = counted  # type: ignore[method-assign]
    return registry, reads


def test_snapshot_is_shared_until_a_change() -> None:
    async def scenario() -> list[int]:
        registry, reads = counting_registry()
        await registry.nodes(max_age=60)
        await registry.nodes(max_age=60)
        seen = [reads[0]]
        await registry.store.put("p0", REG)
        registry.changed()
        assert [n.node_id for n in await registry.nodes(max_age=60)] == ["p0"]
        await registry.nodes(max_age=0)
        return seen + [reads[0]]

    assert asyncio.run(scenario()) == [1, 3]


def test_long_poll_wakes_on_a_local_change_and_times_out_otherwise() -> None:
    async def scenario() -> None:
        registry, _ = counting_registry()
        empty = await registry.listing(None)
        unchanged = await registry.wait_for_change(None, empty.etag, timeout=0.05)
        assert unchanged.etag == empty.etag
        waiter = asyncio.create_task(registry.wait_for_change(None, empty.etag, timeout=30))
        await asyncio.sleep(0)
        await registry.store.put("p0", REG)
        registry.changed()
        woken = await asyncio.wait_for(waiter, 10)
        assert [n.node_id for n in woken.nodes] == ["p0"]

    asyncio.run(scenario())
