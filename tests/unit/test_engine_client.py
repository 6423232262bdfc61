"""EngineClient's control calls against a scripted engine (no process): each call gets its own answer."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from pd_serve.config import EngineConfig
from pd_serve.engine import messages as m
from pd_serve.engine.client import EngineClient


class _Inbox:
    """Stands in for the engine's input socket: keeps what the client sent, decoded."""

    def __init__(self) -> None:
        self.sent: list[object] = []

    async def send(self, data: bytes) -> None:
        self.sent.append(m.decode(data))


def _run(test: Callable[[EngineClient, _Inbox], Awaitable[None]]) -> None:
    async def main() -> None:
        client, inbox = EngineClient(EngineConfig(model="demo")), _Inbox()
        client._in = inbox  # type: ignore[assignment]
        try:
            await test(client, inbox)
        finally:
            client._ctx.destroy(linger=0)

    asyncio.run(main())


async def _sent(inbox: _Inbox, n: int) -> list[object]:
    while len(inbox.sent) < n:
        await asyncio.sleep(0)
    return inbox.sent


def test_concurrent_flush_calls_each_get_their_own_reply() -> None:
    async def test(client: EngineClient, inbox: _Inbox) -> None:
        first = asyncio.ensure_future(client.flush_cache(timeout=5))
        second = asyncio.ensure_future(client.flush_cache(timeout=5))
        a, b = await _sent(inbox, 2)
        assert isinstance(a, m.FlushCache) and isinstance(b, m.FlushCache) and a.call_id != b.call_id
        client._on_message(m.Reply("flushed", {"freed_pages": 2}, call_id=b.call_id))  # out of order
        client._on_message(m.Reply("flushed", {"freed_pages": 1}, call_id=a.call_id))
        assert (await first, await second) == (1, 2)

    _run(test)


def test_concurrent_profile_calls_each_get_their_own_reply() -> None:
    async def test(client: EngineClient, inbox: _Inbox) -> None:
        start = asyncio.ensure_future(client.start_profile("/tmp/traces", timeout=5))
        stop = asyncio.ensure_future(client.stop_profile(timeout=5))
        a, b = await _sent(inbox, 2)
        assert isinstance(a, m.StartProfile) and isinstance(b, m.StopProfile)
        client._on_message(m.Reply("profile", {"trace": "/tmp/traces/t.json"}, call_id=b.call_id))
        client._on_message(m.Reply("profile", {"directory": "/tmp/traces"}, call_id=a.call_id))
        assert await stop == "/tmp/traces/t.json"
        assert await start is None

    _run(test)


def test_stats_waits_for_the_engines_answer() -> None:
    async def test(client: EngineClient, inbox: _Inbox) -> None:
        pending = asyncio.ensure_future(client.stats(timeout=5))
        (request,) = await _sent(inbox, 1)
        assert isinstance(request, m.GetStats)
        answer = m.EngineStats(0, 0, 8, 8, 0, 16, 0, 0, 0, steps=3)
        client._on_message(answer)
        assert await pending is answer and client.last_stats is answer
        with pytest.raises(TimeoutError, match="did not answer within 0.05 s"):
            await client.stats(timeout=0.05)
        assert not client._stats_waiters

    _run(test)
