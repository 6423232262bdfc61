"""The send path of the loop (a member of `TransferLoop`): take the receiver's room request, then
queue, gather and send KV, then Finish; Success once the receiver's FinishAck arrives.

It takes messages only from connections this side accepted. Calls, in order, per room:
- `add(room)` (the scheduler's sender) and `on_message(RoomRequest)`, either first: a request is
  checked (layout, pages, duplicates) and held until the sender exists (`pending`, bounded by
  bootstrap_timeout); then the room is bound to the connection and RoomAccept answers;
- `queue_send(...)` any number of times, then `queue_finish(...)` once: operations of one room run
  strictly in that order (each waits for the one before), so Finish follows every Data;
- `on_message(FinishAck)`: Success. Source pages are read until the room is Success or Failed; the
  engine keeps them allocated until then.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Coroutine
from typing import Any

from pd_serve.intmath import div_ceil
from pd_serve.kv_layout import KVLayout
from pd_serve.transfer.config import RoomState, TransferConfig
from pd_serve.transfer.connection import Connection, ConnectionClosed
from pd_serve.transfer.layout import PoolSet, coalesce, should_stage
from pd_serve.transfer.messages import (
    Data,
    Finish,
    FinishAck,
    Message,
    MessageError,
    RoomAbort,
    RoomAccept,
    RoomRequest,
)
from pd_serve.transfer.room import Destination, Room
from pd_serve.transfer.room_table import RoomTable, abort_reason


class SendPath:
    def __init__(
        self,
        config: TransferConfig,
        pools: PoolSet,
        rooms: RoomTable,
        stats: Counter[str],
        spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[Any]],
        watch_timeouts: Callable[[], None],
    ) -> None:
        self.config, self.pools, self.fingerprint = config, pools, pools.fingerprint
        self.rooms, self.stats = rooms, stats
        self.spawn, self.watch_timeouts = spawn, watch_timeouts
        self.pending: dict[int, tuple[Connection, RoomRequest, float]] = {}  # requests before add()
        self.refused: OrderedDict[int, str] = OrderedDict()  # room -> reason, refused before add()

    def on_message(self, conn: Connection, msg: Message) -> None:
        """A room message on a connection this side accepted (its peer is the receiver)."""
        if isinstance(msg, RoomRequest):
            self._on_request(conn, msg)
        elif isinstance(msg, Data):  # KV flows only from the accepting side
            raise MessageError(f"data from {conn.peer}, a receiver")
        elif isinstance(msg, RoomAbort):
            self._on_abort(conn, msg)
        elif isinstance(msg, FinishAck):
            self._on_finish_ack(conn, msg)
        else:
            self.rooms.drop(msg)

    # ---- the receiver's room request ------------------------------------------------------

    def _on_request(self, conn: Connection, msg: RoomRequest) -> None:
        reason = self._request_refusal(msg)
        if reason is not None:
            self.stats["refused_rooms"] += 1
            conn.send_soon(RoomAbort(msg.room, reason))
            room = self.rooms.senders.get(msg.room)
            if room is not None and room.destination is None:
                self.rooms.fail(room, reason, notify=False)
            elif room is None and msg.room not in self.pending:
                self._remember_refusal(msg.room, reason)
            return
        room = self.rooms.senders.get(msg.room)
        if room is None:
            self.pending[msg.room] = (conn, msg, time.monotonic() + self.config.bootstrap_timeout)
            self.watch_timeouts()
        else:
            self._bind(room, conn, msg)

    def _request_refusal(self, msg: RoomRequest) -> str | None:
        room = self.rooms.senders.get(msg.room)
        if (
            msg.room in self.pending
            or msg.room in self.rooms.finished
            or (room is not None and room.destination is not None)
        ):
            return f"duplicate room {msg.room}: a receiver already claimed it"
        try:
            theirs = KVLayout.from_value(msg.fingerprint)
        except (ValueError, TypeError) as exc:
            return f"bad fingerprint: {exc}"
        mismatch = self.fingerprint.mismatch(theirs)
        if mismatch is not None:
            return mismatch
        if any(p < 0 for p in msg.dst_page_ids):
            return "dst_page_ids: negative page id"
        if len(msg.dst_page_ids) > self.pools.num_pages:  # a prompt that fits here needs no more
            return (
                f"dst_page_ids: {len(msg.dst_page_ids)} pages, more than this sender's {self.pools.num_pages}"
            )
        needed = div_ceil(msg.expected_tokens, self.fingerprint.page_size)
        if msg.expected_tokens < 1 or needed > len(msg.dst_page_ids):
            return f"dst_page_ids: {len(msg.dst_page_ids)} pages cannot hold expected_tokens={msg.expected_tokens}"
        return None

    def _on_abort(self, conn: Connection, msg: RoomAbort) -> None:
        if self.rooms.peer_aborted(self.rooms.senders, conn, msg):
            return
        if msg.room in self.pending and self.pending[msg.room][0] is conn:
            del self.pending[msg.room]
            self._remember_refusal(msg.room, abort_reason(msg))
        else:
            self.rooms.drop(msg)

    def expire_requests(self, now: float) -> None:
        """Refuse each early room request whose sender did not come within bootstrap_timeout."""
        for room_id, (conn, _, deadline) in list(self.pending.items()):
            if now > deadline:
                del self.pending[room_id]
                seconds = self.config.bootstrap_timeout
                conn.send_soon(
                    RoomAbort(room_id, f"no sender for the room within {seconds} s (bootstrap_timeout)")
                )

    def conn_lost(self, conn: Connection) -> None:
        for room_id in [r for r, (c, _, _) in self.pending.items() if c is conn]:
            del self.pending[room_id]

    def _remember_refusal(self, room_id: int, reason: str) -> None:
        self.refused[room_id] = reason
        while len(self.refused) > self.config.finished_rooms_kept:
            self.refused.popitem(last=False)

    def add(self, room: Room) -> None:
        """The scheduler's sender for `room`: bound at once if its request came first."""
        if room.room in self.refused:
            self.rooms.fail(room, self.refused.pop(room.room), notify=False)
            return
        self.rooms.senders[room.room] = room
        self.watch_timeouts()
        pending = self.pending.pop(room.room, None)
        if pending is not None:
            self._bind(room, pending[0], pending[1])

    def _bind(self, room: Room, conn: Connection, msg: RoomRequest) -> None:
        room.destination = Destination(list(msg.dst_page_ids), msg.expected_tokens, msg.prompt_hash)
        room.conn = conn
        conn.rooms.add(room.room)
        room.advance(RoomState.WAITING_FOR_INPUT)
        conn.send_soon(RoomAccept(room.room))

    # ---- KV and the completion ------------------------------------------------------------

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
            self.rooms.fail(room, f"sending to {room.conn.peer} failed: {exc}", notify=True)

    def queue_send(self, room: Room, src_pages: list[int], layers: range, first_page: int) -> None:
        self.queue(room, self._send(room, src_pages, layers, first_page))

    def queue_finish(self, room: Room, first_token: int, logprobs: Any) -> None:
        self.queue(room, self._finish(room, first_token, logprobs))

    async def _send(self, room: Room, src_pages: list[int], layers: range, first_page: int) -> None:
        assert room.destination is not None and room.conn is not None
        plane = room.conn.plane
        assert plane is not None  # a room is bound to a connection only after its handshake
        dst_pages = room.destination.page_ids[first_page : first_page + len(src_pages)]
        runs = coalesce(src_pages, dst_pages, self.pools.max_run_pages)
        staged = plane.gathers and should_stage(runs, self.pools.page_bytes, self.config.min_run_bytes)
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
            if plane.needs_views:
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
        conn = room.conn
        if room.live and conn is not None and conn.plane is not None:
            await conn.plane.send_data(conn, header, views)

    async def _finish(self, room: Room, first_token: int, logprobs: Any) -> None:
        room.advance(RoomState.TRANSFERRING)
        await room.conn.send(Finish(room.room, first_token, logprobs, room.data_done, room.bytes_done))
        room.extra["finish_sent"] = True
        room.touch()

    def _on_finish_ack(self, conn: Connection, msg: FinishAck) -> None:
        room = self.rooms.senders.get(msg.room)
        if room is None or room.conn is not conn or not room.extra.get("finish_sent"):
            self.rooms.drop(msg)
            return
        room.advance(RoomState.SUCCESS)
        self.rooms.retire(room)
