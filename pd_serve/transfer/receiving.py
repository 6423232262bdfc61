"""The receive path of the loop (a member of `TransferLoop`): request KV, take Data, check Finish.

It takes messages only from connections this side opened. Calls, in order, per room:
- `add(room, endpoint)` (the scheduler's receiver): connect once per peer (the handshake), then
  send the RoomRequest;
- `on_message`: RoomAccept, then Data any number of times, then Finish: Success needs the Finish of
  the same room, every Data it announces and every (layer, page) the expected tokens cover; then
  FinishAck tells the sender;
- `timeout_reason(room)`: asked by the loop's sweep when the room outlived a timeout.

Data is written only into the pages of a live room bound to the connection it came on; anything
else is consumed, dropped and counted. A Data header that no sender with our layout could write
(layers, runs or sizes outside our pools, a payload or tags that do not match) closes the
connection before anything is read or allocated for it.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import torch

from pd_serve.transfer.config import RoomState
from pd_serve.transfer.connection import Connection, ConnectionClosed
from pd_serve.transfer.layout import PoolSet, expand
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
from pd_serve.transfer.room import Room
from pd_serve.transfer.room_table import RoomTable


class ReceivePath:
    def __init__(
        self,
        pools: PoolSet,
        rooms: RoomTable,
        stats: Counter[str],
        spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[Any]],
        watch_timeouts: Callable[[], None],
        connect: Callable[[str], Awaitable[Connection]],
    ) -> None:
        self.pools, self.fingerprint, self.rooms, self.stats = pools, pools.fingerprint, rooms, stats
        self.spawn, self.watch_timeouts, self.connect = spawn, watch_timeouts, connect

    def add(self, room: Room, endpoint: str) -> None:
        """The scheduler's receiver for `room`: connect to `endpoint` (once per peer), then request."""
        assert room.destination is not None
        room.coverage = torch.zeros((self.pools.num_layers, len(room.destination.page_ids)), dtype=torch.bool)
        room.extra["endpoint"] = endpoint
        self.rooms.receivers[room.room] = room
        self.watch_timeouts()
        self.spawn(self._bootstrap(room, endpoint))

    async def _bootstrap(self, room: Room, endpoint: str) -> None:
        try:
            conn = await self.connect(endpoint)
        except (OSError, ConnectionError, asyncio.TimeoutError, ValueError) as exc:
            room.peer_unreachable = room.live  # set only if this failure is the room's
            self.rooms.fail(room, f"cannot connect to {endpoint}: {exc or type(exc).__name__}", notify=False)
            return
        if not room.live:
            return
        room.conn = conn
        conn.rooms.add(room.room)
        dest = room.destination
        assert dest is not None
        request = RoomRequest(
            room.room, self.fingerprint.to_dict(), dest.page_ids, dest.expected_tokens, dest.prompt_hash
        )
        try:
            await conn.send(request)
        except (OSError, ConnectionClosed) as exc:
            self.rooms.fail(room, f"sending the room request to {endpoint} failed: {exc}", notify=False)

    def timeout_reason(self, room: Room) -> str:
        """Why a receiver room timed out. One still without its connection blames the peer's
        endpoint as a refused connection does (`peer_unreachable`, "cannot connect to"): the decode
        node then faults the prefill node and looks its record up again (a restarted one listens elsewhere; its
        old port may be taken by a program that accepts and never answers, such as a UCX listener)."""
        reason = room.timeout_reason()
        if room.conn is None and room.state is RoomState.BOOTSTRAPPING:
            room.peer_unreachable = True  # the sweep fails the (live) room with this reason next
            return f"cannot connect to {room.extra.get('endpoint')}: no transfer handshake; the room {reason}"
        return reason

    async def on_message(self, conn: Connection, msg: Message, payload_len: int) -> None:
        """A room message on a connection this side opened (its peer is the sender)."""
        if isinstance(msg, RoomAbort):
            self._on_abort(conn, msg)
            return
        plane = conn.plane
        assert plane is not None  # chosen by the handshake, before any room message is taken
        if isinstance(msg, Data):  # checked before a byte is read or allocated for it, room or not
            reason = self._data_refusal(msg) or plane.data_refusal(msg, payload_len)
            if reason is not None:
                raise MessageError(f"malformed data from {conn.peer}: {reason}")
        room = self.rooms.receivers.get(getattr(msg, "room", -1))
        if room is None or room.conn is not conn or not room.live:
            self.rooms.drop(msg)
            if isinstance(msg, Data):
                await plane.discard(conn, msg, payload_len, self._part_bytes(msg))
            return
        if isinstance(msg, RoomAccept):
            room.advance(RoomState.WAITING_FOR_INPUT)
        elif isinstance(msg, Data):
            await self._on_data(conn, room, msg, payload_len)
        elif isinstance(msg, Finish):
            self._on_finish(conn, room, msg)
        else:
            self.rooms.drop(msg)

    def _on_abort(self, conn: Connection, msg: RoomAbort) -> None:
        if not self.rooms.peer_aborted(self.rooms.receivers, conn, msg):
            self.rooms.drop(msg)

    def _data_refusal(self, msg: Data) -> str | None:
        """Why `msg` cannot be a Data message of a sender with our layout, or None: its layers,
        runs and size must lie within our pools, so that nothing it announces is out of bounds."""
        pools = self.pools
        if len(msg.layers) != 2 or not 0 <= msg.layers[0] < msg.layers[1] <= pools.num_layers:
            return f"layers {msg.layers[:4]} outside 0..{pools.num_layers}"
        if any(len(r) != 2 or r[0] < 0 or r[1] < 1 or r[0] + r[1] > pools.num_pages for r in msg.runs):
            return f"runs {msg.runs[:4]} outside the pool of {pools.num_pages} pages"
        pages = sum(count for _, count in msg.runs)
        if not 0 < pages <= pools.num_pages:
            return f"runs of {pages} pages in all, for a pool of {pools.num_pages}"
        first, end = msg.layers
        if msg.nbytes != (end - first) * 2 * pages * pools.page_bytes:
            return f"nbytes {msg.nbytes} does not match its runs"
        return None

    def _part_bytes(self, msg: Data) -> list[int]:
        """Sizes of the regions a Data message moves, in order (what the sender's views were)."""
        if msg.staged or msg.parts == 1:
            return [msg.nbytes]
        per_layer = [count * self.pools.page_bytes for _, count in msg.runs]
        return per_layer * (2 * (msg.layers[1] - msg.layers[0]))

    def _check_data(self, room: Room, msg: Data) -> str | None:
        assert room.destination is not None
        if not set(expand(msg.runs)) <= set(room.destination.page_ids):
            return "Data names pages that are not this room's destination pages"
        return None

    async def _on_data(self, conn: Connection, room: Room, msg: Data, payload_len: int) -> None:
        plane = conn.plane
        assert plane is not None
        reason = self._check_data(room, msg)
        if reason is not None:
            self.rooms.fail(room, reason, notify=True)
            await plane.discard(conn, msg, payload_len, self._part_bytes(msg))
            return
        room.advance(RoomState.TRANSFERRING)
        layers = range(*msg.layers)
        pages = expand(msg.runs)
        stage = msg.staged and plane.stages_receive
        if stage:
            views = [self.pools.staging(layers, len(pages))]
        elif plane.needs_views:
            views = self.pools.run_views(layers, [(r[0], r[1]) for r in msg.runs])
        else:
            views = []
        room.inflight_writes += 1
        try:
            ok = await plane.receive(conn, msg, payload_len, views, lambda: room.live)
            if ok and stage and room.live:
                await asyncio.to_thread(self.pools.scatter, views[0], layers, pages)
        finally:
            room.inflight_writes -= 1
            if stage:
                self.pools.release(views[0])
        if ok and room.live:
            self._record(room, msg, layers, pages)

    def _record(self, room: Room, msg: Data, layers: range, pages: list[int]) -> None:
        assert room.destination is not None and room.coverage is not None
        index = {p: i for i, p in enumerate(room.destination.page_ids)}
        cols = torch.tensor([index[p] for p in pages], dtype=torch.int64)
        room.coverage[layers.start : layers.stop, cols] = True
        room.data_done += 1
        room.bytes_done += msg.nbytes
        room.touch()
        self.stats["received_bytes"] += msg.nbytes

    def _on_finish(self, conn: Connection, room: Room, msg: Finish) -> None:
        if msg.room != room.room:
            self.rooms.fail(room, f"completion for room {msg.room} arrived on room {room.room}", notify=True)
            return
        if msg.first_token < 0:
            self.rooms.fail(room, f"completion with first token {msg.first_token}", notify=True)
            return
        if (msg.data_messages, msg.nbytes) != (room.data_done, room.bytes_done):
            got = f"{room.data_done} messages / {room.bytes_done} bytes"
            self.rooms.fail(
                room,
                f"completion announces {msg.data_messages} messages / {msg.nbytes} bytes, got {got}",
                notify=True,
            )
            return
        missing = room.missing_coverage(self.fingerprint.page_size)
        if missing is not None:
            self.rooms.fail(room, missing, notify=True)
            return
        room.first_token, room.first_token_logprobs = msg.first_token, msg.first_token_logprobs
        room.advance(RoomState.SUCCESS)
        conn.send_soon(FinishAck(room.room))
        self.rooms.retire(room)
