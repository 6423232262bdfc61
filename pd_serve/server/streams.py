"""The engine streams of one HTTP request: one per planned choice, merged, and closed on every path.

- `engine_stream(...)`: the backend's deltas for one choice, observed into the node's latency metrics;
  it holds one admission slot, released when it ends.
- `merge(streams)`: their deltas as they come, tagged with the choice's position.
- `close_all(streams)` / `close_and_release(streams, ticket)`: closing a stream aborts its engine
  request if unfinished and frees its pages.

Never formats a response: that is `serving.py`'s.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from pd_serve.engine.messages import RequestDelta
from pd_serve.server.planning import PlannedChoice
from pd_serve.server.schemas import PDParams
from pd_serve.server.state import NodeState, Ticket

Stream = AsyncIterator[RequestDelta]


def engine_stream(
    state: NodeState, c: PlannedChoice, pd: PDParams | None, ticket: Ticket, arrival: float
) -> Stream:
    """The backend's deltas for one choice, with latency metrics; holds one admission slot."""

    async def run() -> Stream:
        m = state.metrics
        last = None
        try:
            async for delta in state.backend.generate(c.prompt_ids, c.params, c.request_id, pd):
                now = time.monotonic()
                if pd is not None and last is None and delta.new_token_ids:
                    m.handoff.observe(now - arrival)
                if delta.error and pd is not None:
                    m.room_failed(delta.error)
                if delta.new_token_ids:
                    if last is None:
                        m.ttft.observe(now - arrival)
                    else:
                        m.itl.observe((now - last) / len(delta.new_token_ids))
                    last = now
                    m.generation_tokens.inc(len(delta.new_token_ids))
                if delta.finished:
                    m.e2e.observe(now - arrival)
                    m.prompt_tokens.inc(delta.num_prompt_tokens)
                    m.finished.labels(reason=delta.finish_reason or "stop").inc()
                yield delta
        finally:
            ticket.release_one()

    return run()


async def merge(streams: list[Stream]) -> AsyncIterator[tuple[int, RequestDelta]]:
    """Deltas of several streams as they come, tagged with the stream's position in `streams`."""
    if len(streams) == 1:
        async for delta in streams[0]:
            yield 0, delta
        return
    queue: asyncio.Queue[tuple[int, RequestDelta | None]] = asyncio.Queue()

    async def pump(i: int, stream: Stream) -> None:
        try:
            async for delta in stream:
                queue.put_nowait((i, delta))
        finally:
            queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def close_all(streams: list[Stream]) -> None:
    """Close every engine stream (aborting unfinished requests in the engine)."""
    for s in streams:
        try:
            await s.aclose()  # type: ignore[attr-defined]
        except RuntimeError:  # still being closed by its cancelled pump task, which aborts it
            continue


async def close_and_release(streams: list[Stream], ticket: Ticket) -> None:
    try:
        await close_all(streams)
    finally:
        ticket.release_all()
