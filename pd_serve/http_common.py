"""Pure-ASGI plumbing shared by the bootstrap service, the node API and the frontend.

`GuardMiddleware` puts bearer auth, a request body limit and request counting in front of an app;
each service gives it its own refusal bodies, open paths and counting hook. The pieces it is built
from (`bearer_ok`, `read_body`, `reply`, `StatusRecorder`) also serve the frontend's own router.
Pure ASGI (no BaseHTTPMiddleware), so streams and long-polls are neither buffered nor detached from
client disconnects. Tokens are compared in constant time and never appear in a response or a log.
`error_body` is the OpenAI error shape that the node and the frontend answer with (bootstrap has its
own `{"detail": str}`).
This module must never import another pd_serve package: `bootstrap` depends on it.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Headers = Sequence[tuple[bytes, bytes]]
RequestCounter = Callable[[str, str, str], None]  # (method, route template or "unrouted", status)

BEARER_CHALLENGE: Headers = ((b"www-authenticate", b"Bearer"),)
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    500: "internal_server_error",
    503: "service_unavailable",
}


class BodyCut(Exception):
    """The client disconnected before its whole body arrived; `partial` is what came."""

    def __init__(self, partial: bytes) -> None:
        super().__init__("client disconnected while sending its body")
        self.partial = partial


class StatusRecorder:
    """A `send` that remembers the status its response started with (500 until one starts)."""

    def __init__(self, send: Send) -> None:
        self.status = 500
        self._send = send

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        await self._send(message)


class GuardMiddleware:
    """Auth, body limit and request counting around an ASGI app.

    Order: auth first (a caller without the token learns nothing, not even the size limit), then
    the size limit (413, before the app sees a byte), then the app with the body replayed.
    `unauthorized` and `too_large` are the JSON bodies of the 401 and 413 answers, in the service's
    own error shape; paths in `open_paths` need no token.
    """

    def __init__(
        self,
        app: ASGIApp,
        token: str | None,
        max_body_bytes: int,
        count: RequestCounter,
        *,
        open_paths: frozenset[str],
        unauthorized: bytes,
        too_large: bytes,
    ) -> None:
        self.app = app
        self._token = token.encode() if token else None
        self.max_body_bytes = max_body_bytes
        self._count = count
        self._open_paths = open_paths
        self._unauthorized = unauthorized
        self._too_large = too_large

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        recorder = StatusRecorder(send)
        try:
            await self._guarded(scope, receive, recorder)
        finally:
            route = getattr(scope.get("route"), "path", "unrouted")
            self._count(scope["method"], route, str(recorder.status))

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] not in self._open_paths and not bearer_ok(scope, self._token):
            await reply(send, 401, self._unauthorized, BEARER_CHALLENGE)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            body = None
        else:
            try:
                body = await read_body(receive, self.max_body_bytes)
            except BodyCut as cut:
                body = cut.partial  # the app sees the disconnect on its next receive()
        if body is None:
            await reply(send, 413, self._too_large)
            return
        await self.app(scope, _replay(body, receive), send)


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None, kind: str | None = None
) -> dict[str, Any]:
    """`{"error": {"message", "type", "param", "code"}}`; the type follows `status` unless `kind` is given."""
    if kind is None:
        kind = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "internal_server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def bearer_ok(scope: Scope, token: bytes | None) -> bool:
    """True when no token is set, or the request's `Authorization: Bearer` value equals it."""
    if token is None:
        return True
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, given = value.partition(b" ")
            return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), token)
    return False


async def read_body(receive: Receive, max_bytes: int) -> bytes | None:
    """The whole body, or None as soon as it passes `max_bytes`; BodyCut if the client leaves first."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise BodyCut(b"".join(chunks))
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def reply(send: Send, status: int, body: bytes, headers: Headers = ()) -> None:
    """Send a whole JSON response: `body` is the encoded JSON."""
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


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


def granian_server(
    target: str, host: str, port: int, log_level: str, ssl_certfile: str | None = None, ssl_keyfile: str | None = None
) -> Any:
    """The Granian server every service runs: one ASGI worker, HTTP/1.1 and HTTP/2 on one port (h2c
    on plain TCP, ALPN h2 with TLS), no access log. Granian is imported here, not at module scope."""
    from pathlib import Path

    from granian import Granian
    from granian.constants import HTTPModes, Interfaces
    from granian.log import LogLevels

    return Granian(
        target,
        address=host,
        port=port,
        interface=Interfaces.ASGI,
        workers=1,
        http=HTTPModes.auto,
        ssl_cert=Path(ssl_certfile) if ssl_certfile else None,
        ssl_key=Path(ssl_keyfile) if ssl_keyfile else None,
        log_level=LogLevels(log_level),
        log_access=False,
    )
