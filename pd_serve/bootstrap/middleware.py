"""The ASGI layer in front of every bootstrap route: bearer auth, the body size limit, request counts.

Pure ASGI (no BaseHTTPMiddleware), so long-polls are not buffered. Order: auth first (an
unauthenticated caller learns nothing, not even the size limit), then the size limit, then the app.
The token is compared in constant time and never appears in a response or a log line.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from pd_serve.bootstrap.metrics import BootstrapMetrics

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = frozenset({"/health"})


class GuardMiddleware:
    """Auth, body limit and request counting around the FastAPI app."""

    def __init__(
        self, app: ASGIApp, token: str | None, max_body_bytes: int, metrics: BootstrapMetrics
    ) -> None:
        self.app = app
        self._token = token.encode() if token else None
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
            route = scope.get("route")
            label = getattr(route, "path", "unrouted")
            self.metrics.requests.labels(method=scope["method"], route=label, status=str(status)).inc()

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._authorized(scope):
            detail = (
                "missing or wrong bearer token: send 'Authorization: Bearer <token>' with the token "
                "of the service's --auth-token-file or PD_SERVE_BOOTSTRAP_TOKEN"
            )
            await reply(send, 401, {"detail": detail}, [(b"www-authenticate", b"Bearer")])
            return
        declared = _content_length(scope)
        body = None if declared is not None and declared > self.max_body_bytes else await self._read(receive)
        if body is None:
            detail = f"request body is over the limit of {self.max_body_bytes} bytes"
            await reply(send, 413, {"detail": detail})
            return
        await self.app(scope, _replay(body, receive), send)

    def _authorized(self, scope: Scope) -> bool:
        if self._token is None or scope["path"] in OPEN_PATHS:
            return True
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, given = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self._token)
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


async def reply(
    send: Send, status: int, payload: object, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    """Send a whole JSON response."""
    body = orjson.dumps(payload)
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": head + (headers or [])})
    await send({"type": "http.response.body", "body": body})
