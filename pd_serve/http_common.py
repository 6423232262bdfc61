"""Pure-ASGI plumbing shared by the bootstrap service, the node API and the frontend.

`GuardMiddleware` puts bearer auth, a request body limit and request counting in front of an app;
each service gives it its own refusal bodies, open paths and counting hook. The pieces it is built
from (`bearer_ok`, `read_body`, `reply`, `StatusRecorder`) also serve the frontend's own router.
Pure ASGI (no BaseHTTPMiddleware), so streams and long-polls are neither buffered nor detached from
client disconnects. Tokens are compared in constant time (`token_ok`, `KeyRing`) and never appear in
a response or a log.
Beside it, each a concern of its own: `cluster_token` (reading the cluster token), `openai_errors`
(the error shape the node and the frontend answer with) and `granian_server` (the launcher).
This module must never import another pd_serve package: `bootstrap` depends on it.
"""

from __future__ import annotations

import hashlib
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
            # the body is left unread, so the server drops the connection: over HTTP/1.x say so,
            # or a keep-alive client sends its next request into a closing socket
            closing = ((b"connection", b"close"),) if scope.get("http_version", "1.1").startswith("1") else ()
            await reply(send, 413, self._too_large, closing)
            return
        await self.app(scope, replay(body, receive), send)


def header_value(scope: Scope, name: bytes) -> bytes | None:
    """The first value of header `name` (lower case), or None."""
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


def token_ok(given: bytes | None, token: bytes | None) -> bool:
    """True when no token is set, or `given` equals it (constant time)."""
    if token is None:
        return True
    return given is not None and hmac.compare_digest(given.strip(), token)


class KeyRing:
    """Several accepted secrets (the frontend's API keys). `match` compares a presented key with every
    one of them, always all of them and over their SHA-256 digests (equal lengths), so neither the
    time taken nor an early exit tells which key, or how much of one, matched."""

    def __init__(self, keys: Sequence[str]) -> None:
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def match(self, given: bytes | None) -> int | None:
        """The index of the key `given` equals, or None (also for None)."""
        digest = hashlib.sha256(given or b"").digest()
        found = -1
        for i, expected in enumerate(self._digests):
            hit = hmac.compare_digest(digest, expected)
            found = i if hit and found < 0 else found
        return found if found >= 0 and given is not None else None


def bearer_value(scope: Scope) -> bytes | None:
    """The credential of an `Authorization: Bearer X` header, or None."""
    value = header_value(scope, b"authorization")
    if value is None:
        return None
    scheme, _, given = value.partition(b" ")
    return given.strip() if scheme.lower() == b"bearer" else None


def bearer_ok(scope: Scope, token: bytes | None) -> bool:
    """True when no token is set, or the request's `Authorization: Bearer` value equals it."""
    return token_ok(bearer_value(scope), token)


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


def replay(body: bytes, receive: Receive) -> Receive:
    """A receive that yields the already-read body once, then defers to the real one (disconnects)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed


