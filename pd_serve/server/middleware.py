"""The ASGI layer in front of every node route: API key, body size limit, request counts.

Pure ASGI (no BaseHTTPMiddleware), so streams are neither buffered nor detached from client
disconnects. Order: the key first (a caller without it learns nothing, not even the size limit),
then the size limit, then the app. The key is compared in constant time and never echoed or logged.
Failures are OpenAI-shaped JSON.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from pd_serve.server.errors import error_body
from pd_serve.server.metrics import NodeMetrics

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = frozenset({"/health", "/metrics"})  # probes and scrapers carry no key


class GuardMiddleware:
    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int, metrics: NodeMetrics) -> None:
        self.app = app
        self._key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, send_and_note)
        finally:
            route = getattr(scope.get("route"), "path", "unrouted")
            self.metrics.requests.labels(route=route, status=str(status)).inc()

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._authorized(scope):
            message = "missing or wrong API key: send 'Authorization: Bearer <key>' with the node's --api-key"
            await reply(send, 401, error_body(401, message, code="invalid_api_key"), [(b"www-authenticate", b"Bearer")])
            return
        declared = _content_length(scope)
        body = None if declared is not None and declared > self.max_body_bytes else await self._read(receive)
        if body is None:
            message = f"the request body is over the limit of {self.max_body_bytes} bytes (--max-request-bytes)"
            await reply(send, 413, error_body(413, message, code="request_too_large"))
            return
        await self.app(scope, _replay(body, receive), send)

    def _authorized(self, scope: Scope) -> bool:
        if self._key is None or scope["path"] in OPEN_PATHS:
            return True
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, given = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self._key)
        return False

    async def _read(self, receive: Receive) -> bytes | None:
        """The whole body, or None as soon as it passes the limit."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that yields the already-read body once, then defers to the real one (disconnects)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed


async def reply(send: Send, status: int, payload: object, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = orjson.dumps(payload)
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": head + (headers or [])})
    await send({"type": "http.response.body", "body": body})
