"""The in-process node store (the default): a dict of records, expired lazily on every access.

It lives in one bootstrap process and is lost when that process exits; nodes then re-register
through their client's heartbeat (a 404 makes them register again). All methods run on the
event loop without awaiting in between, so no lock is needed.
"""

from __future__ import annotations

import time

from pd_serve.bootstrap.records import Load, NodeRecord, NodeRegistration
from pd_serve.bootstrap.store import Clock, ExpireHook, NodeNotFound, NodeStore, PutResult, StoreFull


class MemoryStore(NodeStore):
    """Records in a dict keyed by node id."""

    def __init__(
        self, ttl: float, max_nodes: int, on_expire: ExpireHook | None = None, clock: Clock = time.time
    ) -> None:
        super().__init__(ttl, max_nodes, on_expire, clock)
        self._records: dict[str, NodeRecord] = {}

    def _live(self, node_id: str) -> NodeRecord | None:
        record = self._records.get(node_id)
        if record is not None and record.expires_at <= self._clock():
            del self._records[node_id]
            self._on_expire(node_id)
            return None
        return record

    def _sweep(self) -> None:
        for node_id in list(self._records):
            self._live(node_id)

    async def put(self, node_id: str, registration: NodeRegistration) -> PutResult:
        old = self._live(node_id)
        if old is None and len(self._records) >= self.max_nodes:
            self._sweep()
            if len(self._records) >= self.max_nodes:
                raise StoreFull(
                    f"{len(self._records)} nodes registered, the limit is --max-nodes {self.max_nodes}"
                )
        result = self._new_record(node_id, registration, old)
        self._records[node_id] = result.record
        return result

    async def heartbeat(self, node_id: str, load: Load | None) -> NodeRecord:
        old = self._live(node_id)
        if old is None:
            raise NodeNotFound(node_id)
        record = self._beat(old, load)
        self._records[node_id] = record
        return record

    async def delete(self, node_id: str) -> bool:
        return self._live(node_id) is not None and self._records.pop(node_id, None) is not None

    async def get(self, node_id: str) -> NodeRecord | None:
        return self._live(node_id)

    async def list(self) -> list[NodeRecord]:
        self._sweep()
        return [self._records[k] for k in sorted(self._records)]
