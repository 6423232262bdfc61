"""`NodePool`: the frontend's keep-alive HTTP/1.1 connections to the nodes, over asyncio streams.

It does only what the relay's two requests need: a POST with a body, a status line and headers, a
body framed by Content-Length, chunked transfer coding or the end of the connection. It exists for
latency: httpx costs about a millisecond of Python per request on the 2-core VM, this a tenth of
that. Every wait is bounded (`connect_timeout` to connect, `read_timeout` for each read). A
connection goes back to the pool only after its response was read to the end; one left half-read (a
client that went away, a cancelled attempt) is closed, which is how a node learns that its request
is cancelled. A reused connection that the node had closed meanwhile (nothing came back on it) is
replaced by a fresh one once. Every failure to get an answer is an `UpstreamError`; cancellation
propagates unchanged.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

from pd_serve.aio import within
from pd_serve.frontend.upstream import Headers, UpstreamError, describe, find_header, read_whole

_HEAD_LIMIT = 1 << 20  # bytes of status line and headers
_READ_SIZE = 1 << 16


class _Conn:
    __slots__ = ("reader", "writer", "idle_since")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer, self.idle_since = reader, writer, 0.0

    def usable(self, expiry: float) -> bool:
        return (
            not self.writer.is_closing()
            and not self.reader.at_eof()
            and time.monotonic() - self.idle_since < expiry
        )

    def close(self) -> None:
        self.writer.close()


_Key = tuple[str, str, int]  # scheme, host, port


class NodePool:
    """Keep-alive HTTP/1.1 connections to the nodes (see the module docstring)."""

    def __init__(
        self,
        connect_timeout: float,
        read_timeout: float,
        max_idle_per_node: int = 256,
        keepalive_expiry: float = 30.0,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_idle_per_node = max_idle_per_node
        self.keepalive_expiry = keepalive_expiry
        self._idle: dict[_Key, list[_Conn]] = {}
        self._targets: dict[str, tuple[_Key, bytes]] = {}  # URL -> (key, request line + host header)
        self._tls: ssl.SSLContext | None = None

    async def open(self, url: str, body: bytes, headers: Headers) -> RawResponse:
        key, head = self._target(url)
        request = b"".join(
            [head, b"content-length: ", str(len(body)).encode(), b"\r\n"]
            + [b"%s: %s\r\n" % (k, v) for k, v in headers]
            + [b"\r\n", body]
        )
        conn = self._take(key)
        if conn is not None:
            try:
                return await self._exchange(conn, key, request)
            except _Stale:
                pass
        return await self._exchange(await self._connect(key), key, request, fresh=True)

    async def post(self, url: str, body: bytes, headers: Headers) -> tuple[int, bytes]:
        return await read_whole(await self.open(url, body, headers))

    async def aclose(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()

    def _target(self, url: str) -> tuple[_Key, bytes]:
        known = self._targets.get(url)
        if known is None:
            parts = urlsplit(url)
            scheme, host = parts.scheme, parts.hostname or ""
            port = parts.port or (443 if scheme == "https" else 80)
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            netloc = parts.netloc.rpartition("@")[2]
            line = f"POST {path} HTTP/1.1\r\nhost: {netloc}\r\n".encode()
            known = self._targets[url] = ((scheme, host, port), line)
        return known

    def _take(self, key: _Key) -> _Conn | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if conn.usable(self.keepalive_expiry):
                return conn
            conn.close()
        return None

    def _give_back(self, key: _Key, conn: _Conn) -> None:
        idle = self._idle.setdefault(key, [])
        if len(idle) < self.max_idle_per_node and not conn.writer.is_closing():
            conn.idle_since = time.monotonic()
            idle.append(conn)
        else:
            conn.close()

    async def _connect(self, key: _Key) -> _Conn:
        scheme, host, port = key
        tls = self._tls_context() if scheme == "https" else None
        try:
            reader, writer = await within(
                self.connect_timeout, asyncio.open_connection(host, port, ssl=tls, limit=_HEAD_LIMIT)
            )
        except (OSError, asyncio.TimeoutError) as exc:
            raise UpstreamError(f"cannot connect to {host}:{port}: {describe(exc)}") from exc
        return _Conn(reader, writer)

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:  # nodes on a private network, often with self-signed certificates
            self._tls = ssl.create_default_context()
            self._tls.check_hostname = False
            self._tls.verify_mode = ssl.CERT_NONE
        return self._tls

    async def _exchange(self, conn: _Conn, key: _Key, request: bytes, fresh: bool = False) -> RawResponse:
        try:
            conn.writer.write(request)
            head = await within(self.read_timeout, conn.reader.readuntil(b"\r\n\r\n"))
            return RawResponse(self, key, conn, head)
        except asyncio.IncompleteReadError as exc:
            conn.close()
            if not fresh and not exc.partial:
                raise _Stale() from exc
            raise UpstreamError(f"the node closed the connection: {describe(exc)}") from exc
        except (ConnectionError, BrokenPipeError) as exc:
            conn.close()
            if not fresh:
                raise _Stale() from exc
            raise UpstreamError(describe(exc)) from exc
        except (OSError, asyncio.TimeoutError, asyncio.LimitOverrunError, ValueError) as exc:
            conn.close()
            raise UpstreamError(describe(exc)) from exc
        except BaseException:
            conn.close()
            raise


class _Stale(Exception):
    """A pooled connection the node had closed before our request: try a fresh one."""


class RawResponse:
    """Status and headers of a node's answer on a pooled connection; the body is read on demand."""

    def __init__(self, pool: NodePool, key: _Key, conn: _Conn, head: bytes) -> None:
        self._pool, self._key, self._conn = pool, key, conn
        lines = head[:-4].split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        if not version.startswith(b"HTTP/1."):
            raise ValueError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
        self.status = int(rest[:3])
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.append((name.strip().lower(), value.strip()))
        self.headers: Headers = headers
        self._chunked = (self.header(b"transfer-encoding") or b"").lower().endswith(b"chunked")
        length = self.header(b"content-length")
        self._left = int(length) if length is not None and not self._chunked else -1  # -1: not by length
        if self.status in (204, 304):  # never a body, whatever the headers say
            self._chunked, self._left = False, 0
        self._reusable = (self._chunked or self._left >= 0) and (
            (self.header(b"connection") or b"").lower() != b"close"
        )
        self._done = False

    def header(self, name: bytes) -> bytes | None:
        return find_header(self.headers, name)

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])

    def chunks(self) -> AsyncIterator[bytes]:
        return _Body(self)

    async def next_chunk(self) -> bytes:
        """The next piece of the body, b"" at its end (the connection then goes back to the pool)."""
        if self._done:
            return b""
        reader = self._conn.reader
        try:
            if self._chunked:
                data = await within(self._pool.read_timeout, self._next_coded(reader))
            elif self._left >= 0:
                data = await within(self._pool.read_timeout, reader.read(min(self._left, _READ_SIZE)))
                if self._left and not data:
                    raise asyncio.IncompleteReadError(b"", self._left)
                self._left -= len(data)
            else:
                data = await within(self._pool.read_timeout, reader.read(_READ_SIZE))
        except (
            OSError,
            asyncio.TimeoutError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ValueError,
        ) as exc:
            self._conn.close()
            self._done = True
            raise UpstreamError(f"reading the node's answer: {describe(exc)}") from exc
        except BaseException:
            self._conn.close()
            self._done = True
            raise
        if not data or self._left == 0:
            self._finish()
        return data

    async def _next_coded(self, reader: asyncio.StreamReader) -> bytes:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0].strip(), 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, if any
                    pass
                return b""
            data = await reader.readexactly(size + 2)
            if data[-2:] != b"\r\n":
                raise ValueError("a chunk does not end with CRLF")
            return data[:-2]

    def _finish(self) -> None:
        self._done = True
        if self._reusable:
            self._pool._give_back(self._key, self._conn)
        else:
            self._conn.close()

    async def aclose(self) -> None:
        if not self._done:  # half read: the node sees the connection close and cancels the request
            self._done = True
            self._conn.close()


class _Body:
    def __init__(self, response: RawResponse) -> None:
        self._response = response

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        data = await self._response.next_chunk()
        if not data:
            raise StopAsyncIteration
        return data
