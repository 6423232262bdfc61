"""The live rooms of one transfer loop, by role, and what happens to a room at its end.

Runs only on the transfer engine's event loop. Every path ends a room here: `fail` (with a reason,
telling the peer or not) or `retire` after Success; either way the room leaves its registry and its
id is kept (bounded) among the finished ones, so that a late or repeated message for it is dropped.
It never sends anything but a RoomAbort, and never touches pages: the engine frees them once the
room's handle reports a terminal state.
"""

from __future__ import annotations

from collections import Counter, OrderedDict

from pd_serve.transfer.config import RoomState, TransferConfig
from pd_serve.transfer.connection import Connection
from pd_serve.transfer.messages import Message, RoomAbort
from pd_serve.transfer.room import Room

MAX_REASON_CHARS = 500  # a peer's abort reason, as kept and shown


class RoomTable:
    def __init__(self, config: TransferConfig, stats: Counter[str]) -> None:
        self.config, self.stats = config, stats
        self.senders: dict[int, Room] = {}
        self.receivers: dict[int, Room] = {}
        self.finished: OrderedDict[int, None] = OrderedDict()
        self.plane_rooms: Counter[tuple[str, str]] = Counter()  # (plane, "succeeded"|"failed") -> rooms

    def live(self) -> list[Room]:
        return [*self.receivers.values(), *self.senders.values()]

    def drop(self, msg: Message) -> None:
        """A message for an unknown or finished room: counted, never applied."""
        self.stats["dropped_messages"] += 1
        self.stats[f"dropped_{msg.kind}"] += 1

    def abort(self, room: Room, reason: str) -> None:
        self.fail(room, reason, notify=True)

    def fail(self, room: Room, reason: str, notify: bool) -> None:
        if not room.fail(reason):
            return
        self.stats["failed_rooms"] += 1
        conn = room.conn
        if notify and conn is not None and not conn.closed:
            conn.send_soon(RoomAbort(room.room, reason))
        self.retire(room)

    def retire(self, room: Room) -> None:
        registry = self.senders if room.role == "sender" else self.receivers
        if registry.get(room.room) is room:
            del registry[room.room]
        if room.conn is not None:
            room.conn.rooms.discard(room.room)
            if room.conn.plane is not None:
                outcome = "succeeded" if room.state is RoomState.SUCCESS else "failed"
                self.plane_rooms[(room.conn.plane.name, outcome)] += 1
        self.finished[room.room] = None
        while len(self.finished) > self.config.finished_rooms_kept:
            self.finished.popitem(last=False)

    def peer_aborted(self, registry: dict[int, Room], conn: Connection, msg: RoomAbort) -> bool:
        """Fail the room of `msg` in `registry` if it is bound to `conn`; False when none is."""
        room = registry.get(msg.room)
        if room is None or room.conn is not conn:
            return False
        self.fail(room, abort_reason(msg), notify=False)
        return True

    def conn_lost(self, conn: Connection, reason: str) -> None:
        """Fail every room bound to `conn` (its peer cannot be told)."""
        for room_id in list(conn.rooms):
            room = self.receivers.get(room_id) or self.senders.get(room_id)
            if room is not None and room.conn is conn:
                self.fail(room, f"peer {conn.peer} disconnected: {reason}", notify=False)


def abort_reason(msg: RoomAbort) -> str:
    return f"peer aborted the room: {msg.reason[:MAX_REASON_CHARS]}"
