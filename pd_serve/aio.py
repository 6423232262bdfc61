"""asyncio helpers shared by the packages."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable
from typing import TypeVar

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
