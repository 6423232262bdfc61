"""Per-node count of the requests this frontend has in flight, and the guard that holds one slot;
and the frontend's own admission (`Admission`): requests in flight in all and per API key.

A `LoadGuard` is taken when a request is sent to a node and released exactly once, on every path
(success, upstream error, client disconnect, retry onto another pair): use it as a context manager
or call `release()`, which is idempotent. Counts never go negative and never leak. An
`AdmissionSlot` follows the same rules.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

from pd_serve.openai_errors import ErrorCode


class LoadTracker:
    def __init__(self, on_release: Callable[[], None] | None = None) -> None:
        self._on_release = on_release  # told after every release (a node may have room again)
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
        if self._on_release is not None:
            self._on_release()


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


class Admission:
    """Generation requests in flight at the frontend: in all, and per API key (`principal`: the key's
    index, or None without keys). `admit` refuses past a limit (0: none) and otherwise returns a slot
    that must be released exactly once, on every path: use it as a context manager."""

    def __init__(self, max_total: int, max_per_key: int) -> None:
        self.max_total = max_total
        self.max_per_key = max_per_key
        self.total = 0
        self._per_key: defaultdict[int | None, int] = defaultdict(int)

    def in_flight(self, principal: int | None) -> int:
        return self._per_key.get(principal, 0)

    def snapshot(self) -> dict[str, int]:
        """Counts by key label ("key-0", ..., "anonymous"); never the key itself."""
        return {_label(k): v for k, v in self._per_key.items() if v}

    def admit(self, principal: int | None) -> AdmissionSlot | Refusal:
        if self.max_total and self.total >= self.max_total:
            return Refusal(503, f"the frontend is at its limit of {self.max_total} requests in flight "
                           "(--max-concurrent-requests); retry later", ErrorCode.OVERLOADED)
        if self.max_per_key and self._per_key[principal] >= self.max_per_key:
            return Refusal(429, f"this API key has {self.max_per_key} requests in flight, its limit "
                           "(--max-concurrent-per-key); retry when one ends", ErrorCode.TOO_MANY_REQUESTS)
        self.total += 1
        self._per_key[principal] += 1
        return AdmissionSlot(self, principal)

    def _release(self, principal: int | None) -> None:
        self.total -= 1
        self._per_key[principal] -= 1
        if self._per_key[principal] <= 0:
            del self._per_key[principal]


class Refusal:
    """Why `Admission.admit` said no: the status (503 overall, 429 per key), a message and a code."""

    def __init__(self, status: int, message: str, code: str) -> None:
        self.status, self.message, self.code = status, message, code


class AdmissionSlot:
    def __init__(self, admission: Admission, principal: int | None) -> None:
        self._admission = admission
        self._principal = principal
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._admission._release(self._principal)

    def __enter__(self) -> AdmissionSlot:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _label(principal: int | None) -> str:
    return "anonymous" if principal is None else f"key-{principal}"
