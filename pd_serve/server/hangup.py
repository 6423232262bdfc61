"""A client that hangs up before its non-streamed answer is ready: the work for it is stopped.

- `HangUpWatch`: a callable that returns once the client has hung up (the route builds it from the
  ASGI receive).
- `unless_gone(work, watch)`: `work`'s result, or `ClientDisconnected` (499) once the client left
  first, with `work` cancelled until it has stopped; the caller's `finally` then closes the engine
  streams, which aborts them and frees their pages.

A stream needs none of this: it notices the hang-up on its next chunk. Never cancels anything but
the work it was given.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from pd_serve.aio import TaskSet
from pd_serve.openai_errors import ErrorCode
from pd_serve.server.errors import APIError

HangUpWatch = Callable[[], Awaitable[None]]  # returns once the client has hung up
STOP_RETRY_S = 0.05
_STOPPERS = TaskSet()


class ClientDisconnected(APIError):
    """The client hung up before a non-streamed answer was ready: its engine requests were aborted."""

    def __init__(self) -> None:
        super().__init__(499, "the client closed the request before the answer was ready", code=ErrorCode.CLIENT_CLOSED)


async def unless_gone(work: Coroutine[Any, Any, Any], hung_up: HangUpWatch | None) -> Any:
    """`work`'s result; if the client hangs up first, `work` is cancelled and ClientDisconnected raised
    (the caller's `finally` then closes the engine streams, which aborts them and frees their pages)."""
    if hung_up is None:
        return await work
    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(hung_up())
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this request itself is being cancelled
        gone.cancel()
        _STOPPERS.spawn(_until_stopped(task))  # retried in the background: we are being cancelled
        raise
    if task.done():
        gone.cancel()
        return task.result()
    # The client left. Cancel until the work has stopped: before Python 3.12, asyncio.wait_for (the
    # engine client's wait for the next delta) drops a cancel that lands as its inner wait completes,
    # and the request would then run to its end for nobody.
    await _until_stopped(task)
    if not task.cancelled():
        task.exception()  # retrieved: the client is gone, nobody reads it
    raise ClientDisconnected()


async def _until_stopped(task: asyncio.Future[Any]) -> None:
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=STOP_RETRY_S)
