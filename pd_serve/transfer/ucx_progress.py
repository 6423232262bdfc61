"""Progress for one UCX worker on an asyncio loop, without polling: idle, it costs nothing.

UCX's blocking mode: the worker's event file descriptor becomes readable when the worker has
something to progress, and only once it is *armed* (`ucp_worker_arm`, which also drains it). The
loop watches the descriptor with `add_reader`; each wake-up progresses the worker, completes the
requests that finished, and arms it again; `arm()` says busy when events arrived meanwhile, and
then the progress runs again on the next turn of the loop instead of sleeping.

Why our own: ucxx's `blocking` progress mode (0.52) arms the worker once at start and never again
after the first event, so the level-triggered descriptor stays readable and the loop calls
`worker.progress()` back to back forever (one core per process, measured, and the GIL the engine's
scheduler thread needs); and its `request.wait()` without the notifier thread yields in a loop
(`asyncio.sleep(0)`) until the request completes. Here a request's waiter is a plain future that
the progress call resolves.

Call order (all on the loop's thread): `WorkerProgress(worker, loop)`; for each request posted,
`await progress.wait(request, buffer)` (which also progresses the worker soon after the post, so a
request posted after the last arm is never left waiting for an event); `close()` before the worker
is released. It must never block the loop and never call `progress()` unless woken by the worker's
descriptor or a new request (`progress_calls` counts the calls, for tests).
"""

from __future__ import annotations

import asyncio
from typing import Any


class UcxRequestError(ConnectionError):
    """A UCX request ended with an error (peer gone, endpoint closed, cancelled)."""


class WorkerProgress:
    def __init__(self, worker: Any, loop: asyncio.AbstractEventLoop) -> None:
        worker.init_blocking_progress_mode()
        self._worker, self._loop = worker, loop
        self._fd: int = worker.epoll_file_descriptor
        # in flight: (request, the buffer it reads or writes, kept alive until UCX is done, waiter)
        self._inflight: list[tuple[Any, Any, asyncio.Future[None]]] = []
        self._scheduled = False
        self.progress_calls = 0
        loop.add_reader(self._fd, self._on_event)
        self.soon()

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def soon(self) -> None:
        """Progress once the callbacks ready now have run (after a post, an endpoint, a close)."""
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._progress)

    def wait(self, request: Any, buffer: Any) -> asyncio.Future[None]:
        """A future for `request`: its result once it completes, UcxRequestError if it failed. A
        cancelled future leaves the request (and `buffer`) here until UCX is done with it."""
        done: asyncio.Future[None] = self._loop.create_future()
        self._inflight.append((request, buffer, done))
        self.soon()
        return done

    def _on_event(self) -> None:
        # level-triggered: while the worker stays busy the descriptor stays readable, and the
        # progress that soon() queued is the one call of this turn
        if not self._scheduled:
            self._progress()

    def _progress(self) -> None:
        self._scheduled = False
        if self._worker is None:
            return
        self.progress_calls += 1
        self._worker.progress()
        self._complete()
        if not self._worker.arm():  # events came in meanwhile: progress again, next turn
            self.soon()

    def _complete(self) -> None:
        pending = []
        for request, buffer, done in self._inflight:
            if not request.completed:
                pending.append((request, buffer, done))
            elif not done.done():
                try:
                    request.check_error()
                except Exception as exc:  # ucxx raises its own types (UCXCanceled, UCXError...)
                    done.set_exception(UcxRequestError(f"{type(exc).__name__}: {exc}"))
                else:
                    done.set_result(None)
        self._inflight = pending

    def close(self) -> None:
        """Stop watching the worker; waiters still pending fail."""
        if self._worker is None:
            return
        self._loop.remove_reader(self._fd)
        for _, _, done in self._inflight:
            if not done.done():
                done.set_exception(UcxRequestError("the ucx worker was closed"))
        self._inflight.clear()
        self._worker = None
