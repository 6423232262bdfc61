"""The frontend's own queue: requests wait here while every decode node is full, instead of being
sent to a node where they would only queue (and, with several decode nodes, be stuck behind the wrong
one while another frees up).

A decode node is *full* when it last reported requests queued for admission (`Load.queued`: waiting
for free KV pages) and none of this frontend's requests on it has ended since that report
(`NodeSet.full`). While at least one candidate is not full, requests go straight through (first the
ones already waiting, in arrival order). Otherwise a request waits, woken whenever a node's load
report or this frontend's own in-flight count changes, until a node has room, the queue timeout
passes (`--queue-timeout`: 503 with Retry-After) or its client leaves. At most `--max-queued-requests`
wait; one more is refused at once with 503 and Retry-After, before any node did any work for it
(0: refuse at once whenever every decode node is full). Nodes that report no queue (static lists
without the bootstrap service, colocated nodes) are never full, so with them nothing waits here.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

from pd_serve.frontend.downstream import reply
from pd_serve.frontend.errors import RETRY_AFTER_S, error_bytes
from pd_serve.frontend.metrics import FrontendMetrics
from pd_serve.http_common import Send
from pd_serve.openai_errors import ErrorCode


class QueueRefusal(Exception):
    """The request cannot wait (the queue is full) or waited too long; a 503 with this message."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class DecodeQueue:
    def __init__(self, max_queued: int, timeout: float, has_room: Callable[[], bool]) -> None:
        self.max_queued, self.timeout, self.has_room = max_queued, timeout, has_room
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.admitted_after_wait = 0  # requests that waited here and then went on
        self.refused = 0  # refused (queue full) or timed out

    @property
    def depth(self) -> int:
        return len(self._waiters)

    async def wait_turn(self) -> float:
        """Return (the seconds waited) once a decode node has room; QueueRefusal otherwise."""
        if not self._waiters and self.has_room():
            return 0.0
        if len(self._waiters) >= self.max_queued:
            self.refused += 1
            raise QueueRefusal(
                f"every decode node is full and {len(self._waiters)} requests already wait in this "
                f"frontend's queue, its limit (--max-queued-requests); retry later",
                ErrorCode.OVERLOADED,
            )
        start = time.monotonic()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.timeout)
        except TimeoutError:
            self.refused += 1
            raise QueueRefusal(
                f"queued {self.timeout:g} s in the frontend while every decode node was full "
                "(--queue-timeout); retry later",
                ErrorCode.OVERLOADED,
            ) from None
        finally:
            if not waiter.done():
                waiter.cancel()
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            self.wake()  # a waiter that leaves (served, timed out, cancelled) may unblock the next
        self.admitted_after_wait += 1
        return time.monotonic() - start

    def wake(self) -> None:
        """Let waiters go, oldest first, while a decode node has room. Call on every load change."""
        while self._waiters and self.has_room():
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)


async def wait_turn_or_503(queue: DecodeQueue, metrics: FrontendMetrics, send: Send) -> bool:
    """Wait for the request's turn; False once the 503 (queue full, or waited too long) was sent."""
    try:
        waited = await queue.wait_turn()
    except QueueRefusal as exc:
        metrics.queue_refused.inc()
        await reply(send, 503, error_bytes(503, str(exc), code=exc.code), ((b"retry-after", RETRY_AFTER_S.encode()),))
        return False
    if waited:
        metrics.queue_wait.observe(waited)
    return True
