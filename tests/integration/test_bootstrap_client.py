"""`pd_serve.bootstrap.client` against a real service: API calls, watch, peer cache, and a node that
keeps itself registered across a bootstrap restart (memory store) by registering again."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TypeVar

import pytest
from bootstrap_helpers import TTL, registration

from pd_serve.bootstrap.client import (
    BootstrapClient,
    BootstrapError,
    NodeExpired,
    NodeKeeper,
    NodeNotFound,
    PeerCache,
    RetryPolicy,
)
from pd_serve.bootstrap.process import BootstrapProcess
from pd_serve.bootstrap.records import Load, NodeList, NodeRegistration

pytestmark = pytest.mark.timeout(120)
FAST_RETRY = RetryPolicy(attempts=200, initial_backoff=0.05, max_backoff=0.2)
T = TypeVar("T")


def reg(role: str = "prefill", **changes: object) -> NodeRegistration:
    return NodeRegistration.model_validate(registration(role=role, **changes))


@pytest.fixture(scope="module")
def service() -> Iterator[BootstrapProcess]:
    proc = BootstrapProcess(args=["--node-ttl", str(TTL), "--log-level", "warning"])
    yield proc
    proc.stop()


async def within(awaitable: Awaitable[T], seconds: float = 15.0) -> T:
    return await asyncio.wait_for(awaitable, seconds)


async def eventually(probe: Callable[[], bool | Awaitable[bool]], seconds: float = 15.0) -> None:
    """Poll `probe` (plain or async) until it is true; fail after `seconds`."""
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        result = probe()
        if await result if inspect.isawaitable(result) else result:
            return
        assert asyncio.get_running_loop().time() < deadline, f"condition not met within {seconds}s"
        await asyncio.sleep(0.05)


def test_client_calls(service: BootstrapProcess) -> None:
    async def scenario() -> None:
        async with BootstrapClient(service.url, token="") as client:
            record = await client.register("cp0", reg("prefill"))
            assert record.node_id == "cp0" and record.ttl == pytest.approx(TTL)
            await client.register("cd0", reg("decode", page_size=32))
            assert [n.node_id for n in (await client.list_nodes("decode")).nodes] == ["cd0"]
            beat = await client.heartbeat("cd0", Load(running=1, waiting=0, free_pages=9))
            assert beat.load.running == 1
            check = await client.check_pair("cp0", "cd0")
            assert not check.compatible and check.field == "layout.page_size"
            with pytest.raises(NodeExpired):
                await client.heartbeat("ghost")
            with pytest.raises(NodeNotFound):
                await client.check_pair("cp0", "ghost")
            assert await client.get_node("ghost") is None
            assert await client.leave("cp0") and not await client.leave("cp0")
            await client.leave("cd0")

    asyncio.run(scenario())


def test_watch_sees_join_and_leave(service: BootstrapProcess) -> None:
    async def scenario() -> None:
        async with (
            BootstrapClient(service.url, token="") as watcher,
            BootstrapClient(service.url, token="") as node,
        ):
            stream: AsyncIterator[NodeList] = watcher.watch(role="decode", timeout=10)
            first: NodeList = await within(anext(stream))
            assert "wd0" not in [n.node_id for n in first.nodes]
            await node.register("wd0", reg("decode"))
            joined: NodeList = await within(anext(stream))
            assert "wd0" in [n.node_id for n in joined.nodes]
            await node.leave("wd0")
            left: NodeList = await within(anext(stream))
            assert "wd0" not in [n.node_id for n in left.nodes]
            await stream.aclose()  # type: ignore[attr-defined]  # an async generator

    asyncio.run(scenario())


def test_peer_cache_serves_cached_records_and_follows(service: BootstrapProcess) -> None:
    async def scenario() -> None:
        async with BootstrapClient(service.url, token="") as client:
            peers = PeerCache(client, max_age=60)
            await client.register("pc0", reg("prefill"))
            assert (await peers.get("pc0")).transfer[0].address == "127.0.0.1:17000"
            await client.leave("pc0")
            assert (await peers.get("pc0")).node_id == "pc0"  # from the cache, not the service
            peers.invalidate("pc0")
            with pytest.raises(NodeNotFound):
                await peers.get("pc0")
            follower = asyncio.create_task(peers.follow(role="prefill"))
            try:
                await client.register("pc1", reg("prefill"))
                await eventually(lambda: peers.cached("pc1") is not None)
                await client.leave("pc1")
                await eventually(lambda: peers.cached("pc1") is None)
            finally:
                follower.cancel()
                await asyncio.gather(follower, return_exceptions=True)

    asyncio.run(scenario())


def test_node_keeps_itself_registered_across_a_restart() -> None:
    first = BootstrapProcess(args=["--node-ttl", "1.5", "--log-level", "warning"])
    port = first.port
    procs = [first]

    async def scenario() -> None:
        async with BootstrapClient(first.url, token="", retry=FAST_RETRY) as client:
            keeper = NodeKeeper(client, "keep0", reg("decode"), load_fn=lambda: Load(running=2, free_pages=5))
            await keeper.start()
            await asyncio.to_thread(first.stop, False)  # crash: the memory store is gone
            late = asyncio.create_task(client.register("late0", reg("prefill")))  # retries until it is back
            procs.append(await asyncio.to_thread(BootstrapProcess, port, "127.0.0.1", ["--node-ttl", "1.5"]))
            assert (await within(late)).node_id == "late0"
            await eventually(lambda: _registered(client, "keep0"))
            assert keeper.registrations >= 2
            await keeper.stop(leave=True)
            assert await client.get_node("keep0") is None

    try:
        asyncio.run(scenario())
    finally:
        for proc in procs:
            proc.stop()
    assert port == procs[-1].port


async def _registered(client: BootstrapClient, node_id: str) -> bool:
    """Known to the service, with the load the keeper reports."""
    try:
        record = await client.get_node(node_id)
    except BootstrapError:
        return False
    return record is not None and record.load.running == 2
