"""Receiver-side operations of the loop (a mixin of `Node`): request KV, take Data, check Finish.

Data is written only into the pages of a live room bound to the connection it came on; anything
else is consumed, dropped and counted. A Data header that no sender with our layout could write
(layers, runs or sizes outside our pools, a payload or tags that do not match) closes the
connection before anything is read or allocated for it. Success needs the Finish of the same room, every Data it
announces, and every (layer, page) the expected tokens cover.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import torch

from pd_serve.transfer.config import LayoutFingerprint, RoomState, TransferConfig
from pd_serve.transfer.connection import Connection, ConnectionClosed
from pd_serve.transfer.layout import PoolSet, expand
from pd_serve.transfer.messages import (
    Data,
    Finish,
    FinishAck,
    Message,
    MessageError,
    RoomAccept,
    RoomRequest,
)
from pd_serve.transfer.room import Room


class ReceivePath:
    config: TransferConfig
    pools: PoolSet
    fingerprint: LayoutFingerprint
    receivers: dict[int, Room]
    stats: Counter[str]

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        raise NotImplementedError

    def fail(self, room: Room, reason: str, notify: bool) -> None:
        raise NotImplementedError

    def retire(self, room: Room) -> None:
        raise NotImplementedError

    def drop(self, msg: Any) -> None:
        raise NotImplementedError

    async def connect(self, endpoint: str) -> Connection:
        raise NotImplementedError

    def on_finish_ack(self, conn: Any, msg: FinishAck) -> None:
        raise NotImplementedError

    def watch_timeouts(self) -> None:
        raise NotImplementedError

    def add_receiver(self, room: Room, endpoint: str) -> None:
        assert room.destination is not None
        room.coverage = torch.zeros((self.pools.num_layers, len(room.destination.page_ids)), dtype=torch.bool)
        room.extra["endpoint"] = endpoint
        self.receivers[room.room] = room
        self.watch_timeouts()
        self.spawn(self._bootstrap(room, endpoint))

    async def _bootstrap(self, room: Room, endpoint: str) -> None:
        try:
            conn = await self.connect(endpoint)
        except (OSError, ConnectionError, asyncio.TimeoutError, ValueError) as exc:
            self.fail(room, f"cannot connect to {endpoint}: {exc or type(exc).__name__}", notify=False)
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
            self.fail(room, f"sending the room request to {endpoint} failed: {exc}", notify=False)

    async def on_room_message(self, conn: Connection, msg: Message, payload_len: int) -> None:
        if isinstance(msg, FinishAck) and not conn.outbound:
            self.on_finish_ack(conn, msg)
            return
        plane = conn.plane
        assert plane is not None  # chosen by the handshake, before any room message is taken
        if isinstance(msg, Data):  # checked before a byte is read or allocated for it, room or not
            reason = self._data_refusal(msg) or plane.data_refusal(msg, payload_len)
            if reason is not None:
                raise MessageError(f"malformed data from {conn.peer}: {reason}")
        room = self.receivers.get(getattr(msg, "room", -1)) if conn.outbound else None
        if room is None or room.conn is not conn or not room.live:
            self.drop(msg)
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
            self.drop(msg)

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
            self.fail(room, reason, notify=True)
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
            self.fail(room, f"completion for room {msg.room} arrived on room {room.room}", notify=True)
            return
        if msg.first_token < 0:
            self.fail(room, f"completion with first token {msg.first_token}", notify=True)
            return
        if (msg.data_messages, msg.nbytes) != (room.data_done, room.bytes_done):
            got = f"{room.data_done} messages / {room.bytes_done} bytes"
            self.fail(
                room,
                f"completion announces {msg.data_messages} messages / {msg.nbytes} bytes, got {got}",
                notify=True,
            )
            return
        missing = room.missing_coverage(self.fingerprint.page_size)
        if missing is not None:
            self.fail(room, missing, notify=True)
            return
        room.first_token, room.first_token_logprobs = msg.first_token, msg.first_token_logprobs
        room.advance(RoomState.SUCCESS)
        conn.send_soon(FinishAck(room.room))
        self.retire(room)
