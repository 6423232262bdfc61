"""asyncio helpers shared by the packages: a bounded wait, and a set of tasks nobody awaits."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar

_T = TypeVar("_T")

if sys.version_info >= (3, 11):

    async def within(seconds: float, step: Awaitable[_T]) -> _T:
        """`await step`, or TimeoutError after `seconds`.

        asyncio.timeout makes no task per wait, and a cancel of the caller always gets through:
        asyncio.wait_for before 3.12 drops a cancel that lands as the awaited step completes, so a
        cancelled task could run on (an engine stream then outlived its client)."""
        async with asyncio.timeout(seconds):
            return await step

else:

    async def within(seconds: float, step: Awaitable[_T]) -> _T:
        return await asyncio.wait_for(step, seconds)


class TaskSet:
    """Tasks run for their effect, which nobody awaits: held here until they are done, since the
    event loop keeps only weak references to tasks (one nobody holds may be collected mid-run)."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Future[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, _T]) -> asyncio.Task[_T]:
        """Run `coro` as a task of the running loop, held until it is done."""
        return self.keep(asyncio.get_running_loop().create_task(coro))

    def keep(self, task: asyncio.Task[_T]) -> asyncio.Task[_T]:
        """Hold a task that already runs until it is done."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def cancel_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    def __len__(self) -> int:
        return len(self._tasks)
