"""The frontend's client for its two requests per generation request: a POST to the prefill node, and
a POST to the decode node whose answer (JSON or an SSE stream) is relayed.

`Upstream` is that interface and `Response` an answer; every failure to get an answer is an
`UpstreamError`, and cancellation propagates unchanged. Two implementations:
- `node_pool.NodePool`: keep-alive HTTP/1.1 on asyncio streams, what the app uses (for latency: httpx
  costs about a millisecond of Python per request on the 2-core VM, it a tenth of that);
- `HttpxUpstream` here, the same interface over an `httpx.AsyncClient`: the unit tests drive the
  relay through it with `httpx.MockTransport`.
`as_upstream` picks.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

import httpx

Headers = Sequence[tuple[bytes, bytes]]


class UpstreamError(Exception):
    """No (complete) answer from the node: refused, reset, timed out, or not HTTP/1.1 we can read."""


class Response(Protocol):
    status: int
    headers: Headers  # names lower-case

    def header(self, name: bytes) -> bytes | None: ...

    async def read(self) -> bytes: ...

    def chunks(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


class Upstream(Protocol):
    async def open(self, url: str, body: bytes, headers: Headers) -> Response:
        """POST `body` to `url`; returns once the status line and headers are in."""
        ...

    async def post(self, url: str, body: bytes, headers: Headers) -> tuple[int, bytes]:
        """POST and read the whole answer: (status, body)."""
        ...

    async def aclose(self) -> None: ...


def as_upstream(http: httpx.AsyncClient | Upstream) -> Upstream:
    return HttpxUpstream(http) if isinstance(http, httpx.AsyncClient) else http


def find_header(headers: Headers, name: bytes) -> bytes | None:
    """The first value of header `name` (lower case), or None."""
    for k, v in headers:
        if k == name:
            return v
    return None


async def read_whole(response: Response) -> tuple[int, bytes]:
    """(status, body) of an opened response, which is closed on every path: `Upstream.post`."""
    try:
        return response.status, await response.read()
    finally:
        await response.aclose()


def describe(exc: BaseException) -> str:
    """An exception as `Type: message` (just `Type` when it has no message), for an UpstreamError."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class HttpxResponse:
    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status = response.status_code
        self.headers: Headers = [(k.lower(), v) for k, v in response.headers.raw]

    def header(self, name: bytes) -> bytes | None:
        return find_header(self.headers, name)

    async def read(self) -> bytes:
        try:
            return await self._response.aread()
        except httpx.HTTPError as exc:
            raise UpstreamError(describe(exc)) from exc

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:
            raise UpstreamError(describe(exc)) from exc

    async def aclose(self) -> None:
        await self._response.aclose()


class HttpxUpstream:
    """`Upstream` over an `httpx.AsyncClient` (whose timeouts apply)."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def open(self, url: str, body: bytes, headers: Headers) -> HttpxResponse:
        request = self.client.build_request("POST", url, content=body, headers=list(headers))
        try:
            return HttpxResponse(await self.client.send(request, stream=True))
        except httpx.HTTPError as exc:
            raise UpstreamError(describe(exc)) from exc

    async def post(self, url: str, body: bytes, headers: Headers) -> tuple[int, bytes]:
        return await read_whole(await self.open(url, body, headers))

    async def aclose(self) -> None:
        with contextlib.suppress(httpx.HTTPError):
            await self.client.aclose()
