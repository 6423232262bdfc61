"""Sender-side operations of the loop (a mixin of `Node`): queue, gather and send KV, then Finish.

Operations of one room run strictly in the order the scheduler called them (each waits for the
one before), so Finish always follows every Data of its room. Source pages are read until the
room is Success or Failed; the engine keeps them allocated until then.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Coroutine
from typing import Any

from pd_serve.transfer.config import RoomState, TransferConfig
from pd_serve.transfer.connection import ConnectionClosed
from pd_serve.transfer.layout import PoolSet, Run, coalesce, should_stage
from pd_serve.transfer.messages import Data, Finish, FinishAck
from pd_serve.transfer.plane import DataPlane
from pd_serve.transfer.room import Room


class SendPath:
    config: TransferConfig
    pools: PoolSet
    plane: DataPlane
    senders: dict[int, Room]
    stats: Counter[str]

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        raise NotImplementedError

    def fail(self, room: Room, reason: str, notify: bool) -> None:
        raise NotImplementedError

    def retire(self, room: Room) -> None:
        raise NotImplementedError

    def drop(self, msg: Any) -> None:
        raise NotImplementedError

    def queue(self, room: Room, op: Coroutine[Any, Any, None]) -> None:
        room.tail = self.spawn(self._after(room.tail, room, op))

    async def _after(
        self, previous: asyncio.Task[Any] | None, room: Room, op: Coroutine[Any, Any, None]
    ) -> None:
        if previous is not None:
            await asyncio.wait([previous])
        if not room.live:
            op.close()
            return
        try:
            await op
        except (ConnectionClosed, OSError) as exc:
            self.fail(room, f"sending to {room.conn.peer} failed: {exc}", notify=True)

    def queue_send(self, room: Room, src_pages: list[int], layers: range, first_page: int) -> None:
        self.queue(room, self._send(room, src_pages, layers, first_page))

    def queue_finish(self, room: Room, first_token: int, logprobs: Any) -> None:
        self.queue(room, self._finish(room, first_token, logprobs))

    async def _send(self, room: Room, src_pages: list[int], layers: range, first_page: int) -> None:
        assert room.destination is not None
        dst_pages = room.destination.page_ids[first_page : first_page + len(src_pages)]
        runs = coalesce(src_pages, dst_pages, self.pools.max_run_pages)
        staged = self.plane.gathers and should_stage(runs, self.pools.page_bytes, self.config.min_run_bytes)
        room.advance(RoomState.TRANSFERRING)
        nbytes = len(layers) * 2 * len(src_pages) * self.pools.page_bytes
        header = Data(room.room, room.data_done, [layers.start, layers.stop], [], nbytes, staged)
        if staged:
            staging = self.pools.staging(layers, len(src_pages))
            try:
                await asyncio.to_thread(self.pools.gather, layers, src_pages, staging)
                runs = coalesce(dst_pages, dst_pages, self.pools.max_run_pages)
                header.runs.extend([r.dst, r.pages] for r in runs)
                await self._send_data(room, header, [staging])
            finally:
                self.pools.release(staging)
        else:
            header.runs.extend([r.dst, r.pages] for r in runs)
            if self.plane.needs_views:
                await self._send_data(
                    room, header, self.pools.run_views(layers, [(r.src, r.pages) for r in runs])
                )
            else:
                src = {"src_base": self.pools.bases(layers), "src_starts": [r.src for r in runs]}
                await self._send_data(room, Data(**{**header.__dict__, **src}), [])
        room.data_done += 1
        room.bytes_done += nbytes
        room.touch()
        self.stats["sent_bytes"] += nbytes

    async def _send_data(self, room: Room, header: Data, views: list[Any]) -> None:
        if room.live:
            await self.plane.send_data(room.conn, header, views)

    async def _finish(self, room: Room, first_token: int, logprobs: Any) -> None:
        room.advance(RoomState.TRANSFERRING)
        await room.conn.send(Finish(room.room, first_token, logprobs, room.data_done, room.bytes_done))
        room.extra["finish_sent"] = True
        room.touch()

    def on_finish_ack(self, conn: Any, msg: FinishAck) -> None:
        room = self.senders.get(msg.room)
        if room is None or room.conn is not conn or not room.extra.get("finish_sent"):
            self.drop(msg)
            return
        room.advance(RoomState.SUCCESS)
        self.retire(room)


__all__ = ["SendPath", "Run"]
