"""The service behind the bootstrap routes: the store, metrics, change signal and a shared snapshot.

Long-polls re-read the store only through `Registry.nodes(max_age)`, so however many are waiting the
store is read at most twice per poll interval; a change made through this replica wakes them at once.
Everything here runs on the one event loop of the Granian worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from pd_serve.bootstrap.config import BootstrapConfig
from pd_serve.bootstrap.metrics import BootstrapMetrics
from pd_serve.bootstrap.records import NodeList, NodeRecord, Role, list_etag
from pd_serve.bootstrap.store import NodeStore, make_store

log = logging.getLogger("pd_serve.bootstrap")


class ChangeSignal:
    """Wakes local long-polls at once when this replica changes the set (others are polled)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def ticket(self) -> asyncio.Event:
        """Take before reading the store, wait on after: a change in between is not missed."""
        return self._event

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    @staticmethod
    async def wait(ticket: asyncio.Event, timeout: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):  # the caller re-reads the store either way
            await asyncio.wait_for(ticket.wait(), timeout)


class Registry:
    """The service behind the routes: a store, the metrics, the change signal and a shared snapshot.

    Long-polls re-read the store only through `nodes(max_age)`, so however many are waiting, the store
    is read at most twice per poll interval (a listing of 1000 Redis records costs tens of ms).
    """

    def __init__(self, config: BootstrapConfig, metrics: BootstrapMetrics) -> None:
        self.config = config
        self.metrics = metrics
        self.store: NodeStore = make_store(
            config.store, config.node_ttl, config.max_nodes, self._expired, redis_prefix=config.redis_prefix
        )
        self.changes = ChangeSignal()
        self._snapshot: list[NodeRecord] | None = None
        self._snapshot_at = 0.0
        self._snapshot_lock = asyncio.Lock()
        self._generation = 0  # bumped by changed(): a read that overlapped a change is not kept

    def _expired(self, node_id: str) -> None:
        self.metrics.on_expire(node_id)
        log.info("node %s expired", node_id)

    def changed(self) -> None:
        """This replica changed the set: drop the snapshot and wake the long-polls."""
        self._generation += 1
        self._snapshot = None
        self.changes.notify()

    async def nodes(self, max_age: float = 0.0) -> list[NodeRecord]:
        """Live nodes, from a snapshot at most `max_age` seconds old (0: read the store)."""
        if max_age <= 0:
            return await self.store.list()
        async with self._snapshot_lock:
            now = asyncio.get_running_loop().time()
            if self._snapshot is not None and now - self._snapshot_at < max_age:
                return self._snapshot
            generation = self._generation
            nodes = await self.store.list()
            if generation == self._generation:
                self._snapshot, self._snapshot_at = nodes, now
            return nodes

    async def listing(self, role: Role | None, max_age: float = 0.0) -> NodeList:
        nodes = [n for n in await self.nodes(max_age) if role is None or n.role == role]
        return NodeList(nodes=nodes, etag=list_etag(nodes))

    async def wait_for_change(self, role: Role | None, etag: str, timeout: float) -> NodeList:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        interval = self.config.poll_interval
        while True:
            ticket = self.changes.ticket()
            current = await self.listing(role, max_age=interval / 2)
            remaining = deadline - loop.time()
            if current.etag != etag or remaining <= 0:
                return current
            await self.changes.wait(ticket, min(interval, remaining))
