"""The transfer loop: the control connections of one engine, and the members that own its messages.

Everything here runs on the transfer engine's own event loop thread and nowhere else; the
scheduler thread reaches it only through `loop.call_soon_threadsafe`. `TransferLoop` holds, as
members, the room table (`room_table.py`), the handshake (`handshake.py`), the send path
(`sending.py`) and the receive path (`receiving.py`); it owns the connections and the timeout
sweep, and hands every message to the member that owns it:

- Hello, HelloReply, HelloProof: the handshake; nothing else before it is complete;
- on a connection this side accepted (the peer receives): the send path;
- on a connection this side opened (the peer sends): the receive path.

Idle, it wakes for nothing: the timeout sweep runs only while a room or an early room request
exists. It never interprets a room message itself.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import Counter
from typing import Any

from pd_serve.transfer.config import TransferConfig
from pd_serve.transfer.connection import Connection, ConnectionClosed
from pd_serve.transfer.handshake import Handshake
from pd_serve.transfer.layout import PoolSet
from pd_serve.transfer.messages import Data, Hello, HelloProof, HelloReply, Message, MessageError
from pd_serve.transfer.plane import DataPlane
from pd_serve.transfer.receiving import ReceivePath
from pd_serve.transfer.room_table import MAX_REASON_CHARS, RoomTable
from pd_serve.transfer.sending import SendPath

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 0.05
ACCEPT_RETRY_S = 0.1  # after a failed accept (no file descriptor left): wait, then accept again


def _peer_key(conn: Connection) -> str:
    return f"{'to' if conn.outbound else 'from'} {conn.peer}"


class TransferLoop:
    def __init__(self, config: TransferConfig, pools: PoolSet, planes: list[DataPlane]) -> None:
        self.config = config
        self.planes = {plane.name: plane for plane in planes}  # best first
        self.stats: Counter[str] = Counter()
        self.conns: dict[str, asyncio.Task[Connection]] = {}
        self.inbound: set[Connection] = set()
        self.outbound: set[Connection] = set()  # open outbound connections (self.conns: their tasks)
        self.peer_backends: dict[str, str] = {}  # "to|from <peer>" -> the plane of that open connection
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self.rooms = RoomTable(config, self.stats)
        self.handshake = Handshake(config, self.planes, self.stats, self._on_connected)
        self.send = SendPath(config, pools, self.rooms, self.stats, self.spawn, self.watch_timeouts)
        self.receive = ReceivePath(
            pools, self.rooms, self.stats, self.spawn, self.watch_timeouts, self.connect
        )

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
            loop.call_later(self.config.connect_timeout, self.handshake.deadline, conn)
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

    def _on_connected(self, conn: Connection, notes: list[str]) -> None:
        assert conn.plane is not None
        name = conn.plane.name
        self.peer_backends[_peer_key(conn)] = name
        tried = f" (not usable: {'; '.join(notes)})" if notes else ""
        log.info("transfer connection %s: backend %s%s", _peer_key(conn), name, tried)

    def _on_conn_lost(self, conn: Connection, reason: str) -> None:
        for plane in self.planes.values():  # the chosen one, or any set up during the handshake
            plane.close_connection(conn)
        self.peer_backends.pop(_peer_key(conn), None)
        self.rooms.conn_lost(conn, reason)
        self.send.conn_lost(conn)
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
        hello = self.handshake.greeting(conn)
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
            await self.handshake.on_message(conn, msg)
        elif conn.hello is None:
            raise MessageError(f"{msg.kind} before the handshake from {conn.peer}")
        elif conn.outbound:
            await self.receive.on_message(conn, msg, payload_len)
        else:
            self.send.on_message(conn, msg)

    # ---- timeouts and state ----------------------------------------------------------------

    def gauges(self) -> dict[str, int]:
        """Live rooms, early room requests and open control connections (read from the scheduler
        thread: plain len() calls)."""
        return {
            "live_senders": len(self.rooms.senders),
            "live_receivers": len(self.rooms.receivers),
            "pending_room_requests": len(self.send.pending),
            "connections": len(self.inbound) + len(self.outbound),
        }

    def watch_timeouts(self) -> None:
        """Start the sweep unless it runs: called whenever a room or an early room request is added."""
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = self.spawn(self.sweep())

    async def sweep(self) -> None:
        """Fail every room whose state outlived its timeout; expire early requests. Ends once
        nothing is left to time out (watch_timeouts starts it again)."""
        while self.rooms.senders or self.rooms.receivers or self.send.pending:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            now = time.monotonic()
            for room in self.rooms.live():
                if room.expired(now):
                    is_receiver = room.role == "receiver"
                    reason = self.receive.timeout_reason(room) if is_receiver else room.timeout_reason()
                    self.rooms.fail(room, reason, notify=True)
                    if room.inflight_writes and room.conn is not None:
                        # a payload stuck mid-read (a stopped peer) would keep the room Transferring
                        # and its pages held: the stream cannot be resynchronised, so cut it
                        room.conn.close(f"room {room.room} {reason} in the middle of a Data payload")
            self.send.expire_requests(now)

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
