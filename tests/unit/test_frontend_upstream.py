"""`NodePool`, the frontend's HTTP/1.1 client to the nodes, against a small asyncio server on loopback:
framing (Content-Length, chunked, end of connection), keep-alive reuse, a pooled connection the server
closed, a half-read answer, refused connections and read timeouts."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from pd_serve.frontend.node_pool import NodePool
from pd_serve.frontend.upstream import UpstreamError

Handler = Callable[[bytes, asyncio.StreamWriter], Awaitable[bool]]  # -> keep the connection open


class Server:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.closed = asyncio.Event()

    async def __aenter__(self) -> Server:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.startswith(b"content-length")
                )
                self.requests.append(head + await reader.readexactly(length))
                if not await self.handler(head, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed.set()
        finally:
            writer.close()


def _pool(read_timeout: float = 5.0) -> NodePool:
    return NodePool(connect_timeout=2.0, read_timeout=read_timeout)


async def _json(head: bytes, writer: asyncio.StreamWriter) -> bool:
    writer.write(b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 7\r\n\r\n{"a":1}')
    return True


def test_content_length_answers_reuse_one_connection() -> None:
    async def scenario() -> None:
        async with Server(_json) as server:
            pool = _pool()
            for _ in range(3):
                assert await pool.post(server.url + "/v1/x", b'{"q":1}', [(b"x-k", b"v")]) == (
                    200,
                    b'{"a":1}',
                )
            await pool.aclose()
        assert server.connections == 1
        assert (
            server.requests[0].startswith(b"POST /v1/x HTTP/1.1\r\n") and b"x-k: v\r\n" in server.requests[0]
        )
        assert server.requests[0].endswith(b'\r\n\r\n{"q":1}')

    asyncio.run(scenario())


def test_a_chunked_stream_is_read_chunk_by_chunk() -> None:
    async def stream(head: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        for event in (b"data: 1\n\n", b"data: 2\n\n"):
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
            await asyncio.sleep(0.01)
        writer.write(b"0\r\n\r\n")
        return True

    async def scenario() -> None:
        async with Server(stream) as server:
            pool = _pool()
            for _ in range(2):
                r = await pool.open(server.url + "/s", b"{}", [])
                assert r.status == 200 and r.header(b"content-type") == b"text/event-stream"
                assert [c async for c in r.chunks()] == [b"data: 1\n\n", b"data: 2\n\n"]
            await pool.aclose()
        assert server.connections == 1

    asyncio.run(scenario())


def test_a_pooled_connection_the_node_closed_is_replaced() -> None:
    async def once(head: bytes, writer: asyncio.StreamWriter) -> bool:
        await _json(head, writer)
        await writer.drain()
        return False  # close after each answer, without saying so

    async def scenario() -> None:
        async with Server(once) as server:
            pool = _pool()
            for _ in range(3):
                assert await pool.post(server.url + "/", b"{}", []) == (200, b'{"a":1}')
            await pool.aclose()
        assert server.connections == 3

    asyncio.run(scenario())


def test_an_answer_ended_by_closing_and_error_statuses() -> None:
    async def closing(head: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\r\n{}")
        return False

    async def scenario() -> None:
        async with Server(closing) as server:
            pool = _pool()
            assert await pool.post(server.url + "/", b"{}", []) == (503, b"{}")
            await pool.aclose()

    asyncio.run(scenario())


def test_a_half_read_answer_closes_its_connection() -> None:
    async def endless(head: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
        return True

    async def scenario() -> None:
        async with Server(endless) as server:
            pool = _pool()
            r = await pool.open(server.url + "/", b"{}", [])
            assert await r.chunks().__anext__() == b"hello"
            await r.aclose()
            await asyncio.wait_for(server.closed.wait(), 5)  # the server sees the disconnect
            await pool.aclose()

    asyncio.run(scenario())


def test_refused_connections_and_silent_nodes_are_upstream_errors() -> None:
    async def silent(head: bytes, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(5)
        return False

    async def scenario() -> None:
        async with Server(silent) as server:
            url = server.url
            pool = _pool(read_timeout=0.1)
            with pytest.raises(UpstreamError):
                await pool.post(url + "/", b"{}", [])
        with pytest.raises(UpstreamError, match="cannot connect"):
            await pool.post(url + "/", b"{}", [])
        await pool.aclose()

    asyncio.run(scenario())


def test_a_204_has_no_body_and_keeps_its_connection() -> None:
    async def empty(head: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        return True

    async def scenario() -> None:
        async with Server(empty) as server:
            pool = _pool(read_timeout=2.0)  # a body awaited until the connection ends would time out
            for _ in range(2):
                assert await pool.post(server.url + "/", b"{}", []) == (204, b"")
            await pool.aclose()
        assert server.connections == 1

    asyncio.run(scenario())
