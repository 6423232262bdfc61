"""What a node answered, read just far enough for the relay to decide: go on, retry, or give up.

- `open_decode(upstream, url, body, headers)`: D's answer up to its status and, for a stream, its
  first SSE event: `Opened` when it may be relayed, else an `Answer` (an error status, an error
  event, or no answer at all).
- `post_prefill(upstream, url, body, headers)`: P's whole (small, never streamed) answer.
- `error_code(body)`: the `error.code` of an OpenAI error body, compared with `ErrorCode` members.

An `Answer` with status 0 is no HTTP answer (refused, reset, timed out); `detail` then says why.
Nothing here touches breakers, load or metrics: that is the relay's bookkeeping.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import orjson

from pd_serve.frontend.upstream import Headers, Response, Upstream, UpstreamError


@dataclass
class Answer:
    """A node's whole answer, or its absence (status 0, with `detail`)."""

    status: int  # 0: no HTTP answer
    body: bytes
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200


@dataclass
class Opened:
    """D answered 200: its response, the bytes read so far (a whole JSON body, or the first event)."""

    response: Response
    head: bytes
    rest: AsyncIterator[bytes] | None  # None: not a stream, `head` is the whole body


async def post_prefill(upstream: Upstream, url: str, body: bytes, headers: Headers) -> Answer:
    try:
        return Answer(*await upstream.post(url, body, headers))
    except UpstreamError as exc:
        return Answer(0, b"", str(exc))


async def open_decode(upstream: Upstream, url: str, body: bytes, headers: Headers) -> Opened | Answer:
    try:
        response = await upstream.open(url, body, headers)
    except UpstreamError as exc:
        return Answer(0, b"", str(exc))
    try:
        if response.status != 200:
            status, content = response.status, await response.read()
            await response.aclose()
            return Answer(status, content)
        if not (response.header(b"content-type") or b"").startswith(b"text/event-stream"):
            return Opened(response, await response.read(), None)
        chunks = response.chunks()
        head = await _first_event(chunks)
        if _is_error_event(head):
            await response.aclose()
            return Answer(502, _event_payload(head))
        return Opened(response, head, chunks)
    except UpstreamError as exc:
        await response.aclose()
        return Answer(0, b"", str(exc))
    except BaseException:
        await response.aclose()
        raise


def error_code(body: bytes) -> str | None:
    """The `error.code` of an OpenAI-shaped error body, if it has one."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    error = payload.get("error") if isinstance(payload, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else None


async def _first_event(chunks: AsyncIterator[bytes]) -> bytes:
    """Bytes of D's stream up to and including the end of its first SSE event."""
    head = b""
    async for chunk in chunks:
        head += chunk
        if b"\n\n" in head or b"\r\n\r\n" in head:
            return head
    raise UpstreamError("the decode node's stream ended before its first event")


def _event_payload(head: bytes) -> bytes:
    for line in head.splitlines():
        if line.startswith(b"data:"):
            return line[5:].strip()
    return b""


def _is_error_event(head: bytes) -> bool:
    try:
        payload = orjson.loads(_event_payload(head))
    except orjson.JSONDecodeError:
        return False
    return isinstance(payload, dict) and "error" in payload and "choices" not in payload
