"""The loop side of a transfer engine: connections, the room registries and message handling.

Everything here runs on the transfer engine's own event loop thread and nowhere else; the
scheduler thread reaches it only through `loop.call_soon_threadsafe`. Sender-side operations live
in `sending.py`, the handshake (and the choice of each connection's data plane) in `handshake.py`;
this module owns connections, the receive path and timeouts. Idle, it wakes for nothing: the
timeout sweep runs only while a room or an early room request exists.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import Counter, OrderedDict
from typing import Any

from pd_serve.transfer.config import LayoutFingerprint, RoomState, TransferConfig
from pd_serve.transfer.connection import Connection, ConnectionClosed
from pd_serve.transfer.handshake import Handshake
from pd_serve.transfer.layout import PoolSet
from pd_serve.transfer.messages import (
    Data,
    Hello,
    HelloProof,
    HelloReply,
    Message,
    MessageError,
    RoomAbort,
    RoomRequest,
)
from pd_serve.transfer.plane import DataPlane
from pd_serve.transfer.receiving import ReceivePath
from pd_serve.transfer.room import Room
from pd_serve.transfer.sending import SendPath

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 0.05
ACCEPT_RETRY_S = 0.1  # after a failed accept (no file descriptor left): wait, then accept again
MAX_REASON_CHARS = 500  # a peer's abort reason, as kept and shown


def host_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "unknown"
    return f"{socket.gethostname()}/{boot}"


def _peer_key(conn: Connection) -> str:
    return f"{'to' if conn.outbound else 'from'} {conn.peer}"


class Node(SendPath, ReceivePath, Handshake):
    def __init__(self, config: TransferConfig, pools: PoolSet, planes: list[DataPlane]) -> None:
        self.config, self.pools = config, pools
        self.planes = {plane.name: plane for plane in planes}  # best first
        self.fingerprint: LayoutFingerprint = pools.fingerprint
        self.receivers: dict[int, Room] = {}
        self.senders: dict[int, Room] = {}
        self.pending: dict[int, tuple[Connection, RoomRequest, float]] = {}  # requests before sender()
        self.refused: OrderedDict[int, str] = OrderedDict()  # room -> reason, refused before sender()
        self.finished: OrderedDict[int, None] = OrderedDict()
        self.conns: dict[str, asyncio.Task[Connection]] = {}
        self.inbound: set[Connection] = set()
        self.outbound: set[Connection] = set()  # open outbound connections (self.conns: their tasks)
        self.stats: Counter[str] = Counter()
        self.host_id = host_id()
        self.peer_backends: dict[str, str] = {}  # "to|from <peer>" -> the plane of that open connection
        self.plane_rooms: Counter[tuple[str, str]] = Counter()  # (plane, "succeeded"|"failed") -> rooms
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.Task[None] | None = None

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ---- listening and connections -------------------------------------------------------

    async def serve(self, lsock: socket.socket) -> None:
        """Accept control connections until the engine closes. A failed accept (EMFILE when a flood
        of connections used every file descriptor) is logged and retried: it must never end the
        listener, or this engine would take no connection again."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, addr = await loop.sock_accept(lsock)
                conn = Connection(
                    sock, f"{addr[0]}:{addr[1]}", outbound=False, chunk_bytes=self.config.chunk_bytes
                )
            except OSError as exc:
                if lsock.fileno() < 0:  # the engine closed its endpoint
                    return
                self.stats["accept_errors"] += 1
                log.warning("transfer endpoint: accepting a control connection failed: %s", exc)
                await asyncio.sleep(ACCEPT_RETRY_S)
                continue
            self.inbound.add(conn)
            loop.call_later(self.config.connect_timeout, self.handshake_deadline, conn)
            self.spawn(self._run_conn(conn))

    async def _run_conn(self, conn: Connection) -> None:
        reason = "closed"
        try:
            await conn.run_reader(self.handle)
        except MessageError as exc:  # a peer of another version, or a hostile one: say which frame
            reason = str(exc)[:MAX_REASON_CHARS]
            log.warning("transfer control connection %s closed: %s", conn.peer, reason)
        except (ConnectionClosed, OSError) as exc:
            reason = str(exc) or type(exc).__name__
        except Exception as exc:  # a bug of ours: this connection ends, the engine goes on, loudly
            log.exception("transfer control connection %s failed", conn.peer)
            reason = f"internal error: {exc!r}"
        finally:
            conn.close(reason)
            conn.sock.close()
            self.inbound.discard(conn)
            self.outbound.discard(conn)
            self._on_conn_lost(conn, reason)

    def on_connected(self, conn: Connection, notes: list[str]) -> None:
        assert conn.plane is not None
        name = conn.plane.name
        self.peer_backends[_peer_key(conn)] = name
        tried = f" (not usable: {'; '.join(notes)})" if notes else ""
        log.info("transfer connection %s: backend %s%s", _peer_key(conn), name, tried)

    def _on_conn_lost(self, conn: Connection, reason: str) -> None:
        for plane in self.planes.values():  # the chosen one, or any set up during the handshake
            plane.close_connection(conn)
        self.peer_backends.pop(_peer_key(conn), None)
        for room_id in list(conn.rooms):
            room = self.receivers.get(room_id) or self.senders.get(room_id)
            if room is not None and room.conn is conn:
                self.fail(room, f"peer {conn.peer} disconnected: {reason}", notify=False)
        for room_id in [r for r, (c, _, _) in self.pending.items() if c is conn]:
            del self.pending[room_id]
        for endpoint, task in list(self.conns.items()):
            if task.done() and not task.cancelled() and task.exception() is None and task.result() is conn:
                del self.conns[endpoint]

    async def connect(self, endpoint: str) -> Connection:
        """The control connection to `endpoint`, opened and greeted once, then shared."""
        task = self.conns.get(endpoint)
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            task = self.spawn(self._open(endpoint))
            self.conns[endpoint] = task
        return await asyncio.shield(task)

    async def _open(self, endpoint: str) -> Connection:
        scheme, _, address = endpoint.partition("://")
        if scheme != "auto" and scheme not in self.planes:
            raise ConnectionError(
                f"peer endpoint {endpoint!r} uses backend {scheme!r}, this engine offers "
                f"{', '.join(self.planes)} (--transfer-backend {self.config.backend})"
            )
        host, _, port = address.rpartition(":")
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (host, int(port))), self.config.connect_timeout)
        except BaseException:
            sock.close()
            raise
        conn = Connection(sock, endpoint, outbound=True, chunk_bytes=self.config.chunk_bytes)
        hello = self.greeting(conn)
        self.outbound.add(conn)
        self.spawn(self._run_conn(conn))
        try:
            await conn.send(hello)
            await asyncio.wait_for(asyncio.shield(conn.ready), self.config.connect_timeout)
        except BaseException as exc:  # a handshake that never completed: nothing may keep it open
            conn.close(f"handshake with {endpoint} did not complete: {exc or type(exc).__name__}")
            raise
        return conn

    # ---- dispatch ------------------------------------------------------------------------

    async def handle(self, conn: Connection, msg: Message, payload_len: int) -> None:
        if payload_len and not isinstance(msg, Data):  # its payload would be read as frames
            raise MessageError(f"{msg.kind} from {conn.peer} with a {payload_len}-byte payload")
        if isinstance(msg, Hello | HelloReply | HelloProof):
            await self.on_handshake(conn, msg)
        elif conn.hello is None:
            raise MessageError(f"{msg.kind} before the handshake from {conn.peer}")
        elif isinstance(msg, RoomRequest) and not conn.outbound:
            self._on_request(conn, msg)
        elif isinstance(msg, Data) and not conn.outbound:  # KV flows only from the accepting side
            raise MessageError(f"data from {conn.peer}, a receiver")
        elif isinstance(msg, RoomAbort):
            self._on_abort(conn, msg)
        else:
            await self.on_room_message(conn, msg, payload_len)

    def _on_abort(self, conn: Connection, msg: RoomAbort) -> None:
        room = (self.receivers if conn.outbound else self.senders).get(msg.room)
        reason = f"peer aborted the room: {msg.reason[:MAX_REASON_CHARS]}"
        if room is not None and room.conn is conn:
            self.fail(room, reason, notify=False)
        elif not conn.outbound and msg.room in self.pending and self.pending[msg.room][0] is conn:
            del self.pending[msg.room]
            self._remember_refusal(msg.room, reason)
        else:
            self.drop(msg)

    # ---- both sides ------------------------------------------------------------------------

    def gauges(self) -> dict[str, int]:
        """Live rooms, early room requests and open control connections (read from the scheduler
        thread: plain len() calls)."""
        return {
            "live_senders": len(self.senders),
            "live_receivers": len(self.receivers),
            "pending_room_requests": len(self.pending),
            "connections": len(self.inbound) + len(self.outbound),
        }

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

    def _timeout_reason(self, room: Room) -> str:
        """A receiver still without its connection blames the peer's endpoint, with the words of a
        refused connection ("cannot connect to"): the decode node then faults the prefill node and
        looks its record up again (a restarted one listens elsewhere; its old port may be taken by
        a program that accepts and never answers, such as a UCX listener)."""
        reason = room.timeout_reason()
        if room.role == "receiver" and room.conn is None and room.state is RoomState.BOOTSTRAPPING:
            return f"cannot connect to {room.extra.get('endpoint')}: no transfer handshake; the room {reason}"
        return reason

    def watch_timeouts(self) -> None:
        """Start the sweep unless it runs: called whenever a room or an early room request is added."""
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = self.spawn(self.sweep())

    async def sweep(self) -> None:
        """Fail every room whose state outlived its timeout; expire early requests. Ends once
        nothing is left to time out (watch_timeouts starts it again)."""
        while self.receivers or self.senders or self.pending:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            now = time.monotonic()
            for room in [*self.receivers.values(), *self.senders.values()]:
                if room.expired(now):
                    reason = self._timeout_reason(room)
                    self.fail(room, reason, notify=True)
                    if room.inflight_writes and room.conn is not None:
                        # a payload stuck mid-read (a stopped peer) would keep the room Transferring
                        # and its pages held: the stream cannot be resynchronised, so cut it
                        room.conn.close(f"room {room.room} {reason} in the middle of a Data payload")
            for room_id, (conn, _, deadline) in list(self.pending.items()):
                if now > deadline:
                    del self.pending[room_id]
                    seconds = self.config.bootstrap_timeout
                    conn.send_soon(
                        RoomAbort(room_id, f"no sender for the room within {seconds} s (bootstrap_timeout)")
                    )

    async def close(self) -> None:
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for conn in list(self.inbound):
            conn.close("engine closed")
        for task in self.conns.values():
            if task.done() and not task.cancelled() and task.exception() is None:
                task.result().close("engine closed")
        for plane in self.planes.values():
            await plane.close()
