"""The one interface every node store implements, its errors, and the factory that picks a store.

Call order: `make_store(...)`, `await store.start()`, then any number of concurrent calls, then
`await store.close()`. A store owns expiry: a record whose `expires_at` has passed is never returned
and is reported once through `on_expire` (with several replicas on one Redis, by the replica that
removed it). Stores never raise HTTP errors; the app maps `NodeNotFound` and `StoreFull`.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable
from typing import NamedTuple

from pd_serve.bootstrap.records import Load, NodeRecord, NodeRegistration

Clock = Callable[[], float]
ExpireHook = Callable[[str], None]  # called with the node id


class NodeNotFound(LookupError):
    """The node is unknown or has expired."""


class StoreFull(RuntimeError):
    """A new node would exceed --max-nodes."""


class PutResult(NamedTuple):
    record: NodeRecord
    created: bool  # a new registration (or one whose identity changed), not a refresh


class NodeStore(abc.ABC):
    """Live node records with a TTL; see the module docstring for the call order."""

    def __init__(
        self, ttl: float, max_nodes: int, on_expire: ExpireHook | None = None, clock: Clock = time.time
    ) -> None:
        self.ttl = ttl
        self.max_nodes = max_nodes
        self._on_expire = on_expire or (lambda node_id: None)
        self._clock = clock

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Open connections; the memory store needs nothing."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    @abc.abstractmethod
    async def put(self, node_id: str, registration: NodeRegistration) -> PutResult:
        """Register or refresh; raises StoreFull when a new node would exceed max_nodes."""

    @abc.abstractmethod
    async def heartbeat(self, node_id: str, load: Load | None) -> NodeRecord:
        """Extend the TTL (and replace the load if given); raises NodeNotFound."""

    @abc.abstractmethod
    async def delete(self, node_id: str) -> bool:
        """Remove a node; False when it was not there."""

    @abc.abstractmethod
    async def get(self, node_id: str) -> NodeRecord | None:
        """One live node, or None."""

    @abc.abstractmethod
    async def list(self) -> list[NodeRecord]:
        """All live nodes, sorted by node_id."""

    async def ping(self) -> bool:
        """True when the backing store answers."""
        return True

    def _new_record(self, node_id: str, reg: NodeRegistration, old: NodeRecord | None) -> PutResult:
        """The record a put stores: a refresh keeps registered_at, anything else starts anew."""
        now = self._clock()
        refresh = old is not None and old.expires_at > now and old.same_identity(reg)
        registered_at = old.registered_at if refresh and old is not None else now
        record = NodeRecord(
            node_id=node_id,
            registered_at=registered_at,
            updated_at=now,
            expires_at=now + self.ttl,
            **reg.model_dump(),
        )
        return PutResult(record, created=not refresh)

    def _beat(self, record: NodeRecord, load: Load | None) -> NodeRecord:
        now = self._clock()
        update: dict[str, object] = {"updated_at": now, "expires_at": now + self.ttl}
        if load is not None:
            update["load"] = load
        return record.model_copy(update=update)


def make_store(
    url: str,
    ttl: float,
    max_nodes: int,
    on_expire: ExpireHook | None = None,
    redis_prefix: str = "pd-serve:bootstrap",
) -> NodeStore:
    """`memory` gives the in-process store; a redis:// URL the shared Redis store."""
    if url == "memory":
        from pd_serve.bootstrap.memory_store import MemoryStore

        return MemoryStore(ttl, max_nodes, on_expire)
    from pd_serve.bootstrap.redis_store import RedisStore

    return RedisStore(url, ttl, max_nodes, on_expire, prefix=redis_prefix)
