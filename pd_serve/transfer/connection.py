"""A control connection to one peer engine: framed messages over a non-blocking TCP socket.

Runs only on the transfer engine's event loop. Frames are written whole under a lock so that the
tcp data plane can follow a header with its payload; payloads are read straight into the caller's
views (no intermediate copy). It never decides what a message means: the engine does.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from pd_serve.transfer.messages import (
    FRAME_PREFIX,
    MAX_HANDSHAKE_HEADER_BYTES,
    MAX_HEADER_BYTES,
    Message,
    MessageError,
    decode,
    encode,
)

if TYPE_CHECKING:
    from pd_serve.transfer.plane import DataPlane

Handler = Callable[["Connection", Message, int], Awaitable[None]]
HEADER_CHUNK_BYTES = 1 << 20  # a large header is read in pieces of this size, as they arrive


class ConnectionClosed(ConnectionError):
    pass


class Connection:
    def __init__(self, sock: socket.socket, peer: str, outbound: bool, chunk_bytes: int) -> None:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.peer = peer  # endpoint (outbound) or address (inbound), for messages
        self.outbound = outbound
        self.chunk_bytes = chunk_bytes
        self.closed = False
        self.close_reason: str | None = None
        self.ready: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.hello: Any = None  # the peer's Hello / HelloReply, once the handshake is complete
        self.handshake: Any = None  # handshake state until then (handshake.py)
        self.plane: DataPlane | None = None  # the data plane the handshake chose for this connection
        self.plane_state: Any = None  # data plane per-connection state (UCX endpoint, tag nonce)
        self.rooms: set[int] = set()
        self._write_lock = asyncio.Lock()
        self._loop = asyncio.get_running_loop()

    async def send(self, message: Message, payload: Sequence[Any] = ()) -> None:
        """Write one frame; `payload` items expose the buffer protocol, written in order."""
        views = [memoryview(p).cast("B") for p in payload]
        frame = encode(message, sum(v.nbytes for v in views))
        async with self._write_lock:
            self._check_open()
            await self._loop.sock_sendall(self.sock, frame)
            for view in views:
                for start in range(0, view.nbytes, self.chunk_bytes):
                    self._check_open()
                    await self._loop.sock_sendall(self.sock, view[start : start + self.chunk_bytes])

    def send_soon(self, message: Message) -> None:
        """Fire-and-forget control message (aborts, acks); a closed connection drops it."""
        if not self.closed:
            self._loop.create_task(self._send_quietly(message))

    async def _send_quietly(self, message: Message) -> None:
        # the peer is gone; its rooms fail through the reader, not through this message
        with contextlib.suppress(OSError, ConnectionClosed):
            await self.send(message)

    async def read_into(self, view: memoryview, live: Callable[[], bool] | None = None) -> bool:
        """Fill `view` from the stream, in chunks. Once `live()` turns False the rest is discarded
        into a scratch buffer, so a failed room's pages are never written again; returns live()."""
        scratch: bytearray | None = None
        pos = 0
        while pos < view.nbytes:
            n = min(self.chunk_bytes, view.nbytes - pos)
            if live is not None and not live():
                scratch = scratch or bytearray(min(self.chunk_bytes, view.nbytes))
                target = memoryview(scratch)[:n]
            else:
                target = view[pos : pos + n]
            got = await self._loop.sock_recv_into(self.sock, target)
            if got == 0:
                raise ConnectionClosed(f"peer {self.peer} closed the connection")
            pos += got
        return live is None or live()

    async def discard(self, nbytes: int) -> None:
        """Read and drop `nbytes` of payload (a message for an unknown or failed room)."""
        scratch = memoryview(bytearray(max(1, min(nbytes, self.chunk_bytes))))
        while nbytes > 0:
            n = min(nbytes, scratch.nbytes)
            await self.read_into(scratch[:n])
            nbytes -= n

    async def run_reader(self, handler: Handler) -> None:
        """Read frames until the connection closes; the handler must consume each frame's payload.
        Until the handshake is complete a header may hold MAX_HANDSHAKE_HEADER_BYTES at most."""
        prefix = bytearray(FRAME_PREFIX.size)
        while True:
            await self.read_into(memoryview(prefix))
            header_len, payload_len = FRAME_PREFIX.unpack(prefix)
            limit = MAX_HEADER_BYTES if self.hello is not None else MAX_HANDSHAKE_HEADER_BYTES
            if header_len > limit:
                raise MessageError(f"control header of {header_len} bytes from {self.peer} exceeds {limit}")
            await handler(self, decode(await self._read_header(header_len)), payload_len)

    async def _read_header(self, n: int) -> bytes:
        """n bytes, held only as they arrive: a peer that announces a large header and sends
        nothing makes this side allocate nothing."""
        if n <= MAX_HANDSHAKE_HEADER_BYTES:  # small: one buffer, filled in place
            body = bytearray(n)
            await self.read_into(memoryview(body))
            return bytes(body)
        parts = []
        while n > 0:
            chunk = await self._loop.sock_recv(self.sock, min(n, HEADER_CHUNK_BYTES))
            if not chunk:
                raise ConnectionClosed(f"peer {self.peer} closed the connection")
            parts.append(chunk)
            n -= len(chunk)
        return b"".join(parts)

    def _check_open(self) -> None:
        if self.closed:
            raise ConnectionClosed(f"connection to {self.peer} is closed: {self.close_reason}")

    def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed, self.close_reason = True, reason
        if not self.ready.done():
            self.ready.set_exception(ConnectionClosed(reason))
            self.ready.exception()  # mark retrieved
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the reader, which closes the socket
        except OSError:
            self.sock.close()
