"""Per-node count of the requests this frontend has in flight, and the guard that holds one slot.

A `LoadGuard` is taken when a request is sent to a node and released exactly once, on every path
(success, upstream error, client disconnect, retry onto another pair): use it as a context manager
or call `release()`, which is idempotent. Counts never go negative and never leak.
"""

from __future__ import annotations

from collections import defaultdict


class LoadTracker:
    def __init__(self) -> None:
        self._active: defaultdict[str, int] = defaultdict(int)
        self.total: defaultdict[str, int] = defaultdict(int)  # requests ever sent, per node

    def active(self, node_id: str) -> int:
        return self._active.get(node_id, 0)

    def snapshot(self) -> dict[str, int]:
        return {k: v for k, v in self._active.items() if v}

    def acquire(self, node_id: str) -> LoadGuard:
        self._active[node_id] += 1
        self.total[node_id] += 1
        return LoadGuard(self, node_id)

    def _release(self, node_id: str) -> None:
        self._active[node_id] -= 1
        if self._active[node_id] <= 0:
            del self._active[node_id]


class LoadGuard:
    def __init__(self, tracker: LoadTracker, node_id: str) -> None:
        self._tracker = tracker
        self.node_id = node_id
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._tracker._release(self.node_id)

    def __enter__(self) -> LoadGuard:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
