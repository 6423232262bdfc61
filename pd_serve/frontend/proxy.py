"""One client request -> a (prefill, decode) pair -> the decode node's answer relayed to the client.

Upstream contract (what the nodes of `pd-serve prefill` / `pd-serve decode` implement):
- The same JSON body goes to the decode node D and the prefill node P at the same time, each with a
  top-level `"pd": {"room": R, "prefill": P_id, "decode": D_id}`, R a fresh `secrets.randbits(63)`
  per attempt. In static mode (`--prefill/--decode URL` lists, no bootstrap) node ids are the URLs
  and `pd` also carries `"prefill_url"`, so that a decode node without bootstrap can read the
  prefill node's `transfer_endpoint` from its `GET /server_info`.
- P answers 200 with a small JSON (room, prompt_tokens, timings), never streamed, or an OpenAI error.
  Its answer is not relayed; it decides whom a failure is blamed on.
- D's answer is the client's answer: status, content type and body (JSON, or the SSE stream) are
  relayed unchanged. A request sent without `pd` to a decode node is served there alone.

Retry rule: an attempt may fail before the client got a byte (D unreachable, D answers an error
status, D's stream opens with an error event, or P fails while D has not answered: then D's request
is cancelled at once rather than left waiting for KV that will not come). Such a failure is retried
on another pair with a new room, excluding the node blamed, up to `--max-retries` times; client
errors (4xx but 429) are relayed, never retried. Once a byte reached the client nothing is retried:
a stream broken by D ends with an error event. The status line is held back until D's first SSE
event is known not to be an error, so an early error event is still retryable.

Both upstream requests go through an `upstream.Upstream` (in the app, `NodePool`: keep-alive HTTP/1.1
on asyncio streams, chosen over httpx for its per-request cost). D's body is the client's raw bytes
with the `pd` object spliced in before the closing brace, not a re-encoding of the parsed body.

Cancellation: the caller runs `serve` as a task and cancels it when the client disconnects; every
path (success, failure, retry, cancel) closes D's response, cancels P's request unless it succeeded
already, and releases both nodes' load guards and breaker probe slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from pd_serve.frontend.config import FrontendConfig
from pd_serve.frontend.errors import RETRY_AFTER_S, error_bytes, sse_error
from pd_serve.frontend.metrics import FrontendMetrics
from pd_serve.frontend.nodes import Node, NodeSet
from pd_serve.frontend.router import Choice, NoPair, Router
from pd_serve.frontend.upstream import NodePool, Response, Upstream, UpstreamError, as_upstream
from pd_serve.http_common import Headers, Message, Send
from pd_serve.http_common import reply as send_reply

log = logging.getLogger(__name__)
PREFILL_SETTLE_S = 0.2  # after D failed: how long to wait for P's verdict before blaming D
_HOP_HEADERS = frozenset(
    {b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"date", b"server"}
)


class ClientGone(Exception):
    """The client went away while the answer was being sent."""


@dataclass(frozen=True)
class Failure:
    """An attempt that failed before the client got a byte."""

    status: int
    body: bytes  # OpenAI-shaped JSON
    retryable: bool
    blame: tuple[str, ...]  # node ids not to try again for this request
    reason: str  # the retries metric label
    headers: tuple[tuple[bytes, bytes], ...] = ()


@dataclass
class PrefillResult:
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


@dataclass
class Timing:
    arrival: float = field(default_factory=time.monotonic)
    last_chunk: float = 0.0
    chunks: int = 0


class Relay:
    def __init__(
        self,
        config: FrontendConfig,
        nodes: NodeSet,
        router: Router,
        upstream: Upstream | httpx.AsyncClient,
        metrics: FrontendMetrics,
    ) -> None:
        self.config = config
        self.nodes = nodes
        self.router = router
        self.upstream = as_upstream(upstream)
        self.metrics = metrics
        self.headers = [(b"content-type", b"application/json")] + [
            (k.lower().encode(), v.encode()) for k, v in config.node_headers.items()
        ]
        self._background: set[asyncio.Task[Any]] = set()

    async def serve(self, path: str, body: dict[str, Any], raw: bytes, send: Send) -> None:
        """Answer one OpenAI generation request through `send` (ASGI), retrying as the module says."""
        timing = Timing()
        prompt = prompt_text(body)
        exclude: frozenset[str] = frozenset()
        failure: Failure | None = None
        for attempt in range(self.config.max_retries + 1):
            try:
                choice = self.router.choose(prompt, exclude)
            except NoPair as exc:
                if failure is None:
                    await reply(
                        send,
                        503,
                        error_bytes(503, str(exc), code="no_pair"),
                        ((b"retry-after", RETRY_AFTER_S.encode()),),
                    )
                    return
                break
            failure = await self._attempt(choice, path, body, raw, send, timing, attempt)
            if failure is None:
                return
            log.info(
                "attempt %d on %s failed (%s): %s",
                attempt + 1,
                "+".join(choice.node_ids),
                failure.reason,
                failure.body[:300].decode(errors="replace"),
            )
            if not failure.retryable:
                break
            exclude = exclude | frozenset(failure.blame)
            if attempt < self.config.max_retries:
                self.metrics.retries.labels(reason=failure.reason).inc()
        assert failure is not None
        headers = failure.headers
        if failure.status in (429, 503) and not any(k == b"retry-after" for k, _ in headers):
            headers = (*headers, (b"retry-after", RETRY_AFTER_S.encode()))  # every pair tried was busy
        await reply(send, failure.status, failure.body, headers)

    async def _attempt(
        self,
        choice: Choice,
        path: str,
        body: dict[str, Any],
        raw: bytes,
        send: Send,
        timing: Timing,
        attempt: int,
    ) -> Failure | None:
        d, p = choice.decode, choice.prefill
        p_task: asyncio.Task[PrefillResult] | None = None
        if p is None:
            self.metrics.local_prefill.inc()
            d_body = raw
        else:
            pd: dict[str, Any] = {"room": secrets.randbits(63), "prefill": p.node_id, "decode": d.node_id}
            if self.config.static:
                pd["prefill_url"] = p.url
            d_body = with_pd(raw, bool(body), pd)
        guard = self.nodes.load.acquire(d.node_id)
        self.metrics.node_requests.labels(node=d.node_id, role=d.role).inc()
        breaker = self.nodes.breaker(d.node_id)
        # D's request leaves first: its KV receiver reaching P is what P's prefill waits for
        d_task = asyncio.create_task(self._open_decode(d, path, d_body))
        if p is not None:
            p_task = asyncio.create_task(self._prefill(p, path, d_body))
        delivered = False
        try:
            started = await self._open(d, p, d_task, p_task)
            if isinstance(started, Failure):
                return started
            extra = [
                (b"x-pd-decode", d.node_id.encode()),
                (b"x-pd-prefill", (p.node_id if p else "local").encode()),
                (b"x-pd-attempts", str(attempt + 1).encode()),
            ]
            delivered = True  # from here on the client has (or may have) bytes: no retry
            await self._relay(started, send, timing, extra, d)
            breaker.success()
            return None
        finally:
            guard.release()
            breaker.release()
            if p_task is not None and not p_task.done():
                if delivered:
                    self._background.add(p_task)  # P's answer is only bookkeeping now; let it land
                    p_task.add_done_callback(self._background.discard)
                else:
                    p_task.cancel()

    async def _prefill(self, p: Node, path: str, payload: bytes) -> PrefillResult:
        """P's request; records P's breaker verdict and always releases its load guard."""
        breaker = self.nodes.breaker(p.node_id)
        self.metrics.node_requests.labels(node=p.node_id, role=p.role).inc()
        with self.nodes.load.acquire(p.node_id):
            try:
                result = PrefillResult(*await self.upstream.post(p.url + path, payload, self.headers))
            except UpstreamError as exc:
                result = PrefillResult(0, b"", str(exc))
            except asyncio.CancelledError:
                breaker.release()
                raise
        if result.ok:
            breaker.success()
        elif _node_fault(result.status):
            breaker.failure()
            self.metrics.node_failures.labels(node=p.node_id, kind="prefill").inc()
        else:
            breaker.release()
        return result

    async def _open(
        self,
        d: Node,
        p: Node | None,
        d_task: asyncio.Task[Opened | tuple[int, bytes, str]],
        p_task: asyncio.Task[PrefillResult] | None,
    ) -> Opened | Failure:
        """D's status and first event, raced against P failing; a Failure when the attempt is lost."""
        try:
            if p is not None and p_task is not None:
                await asyncio.wait({d_task, p_task}, return_when=asyncio.FIRST_COMPLETED)
                if not d_task.done() and not p_task.result().ok:
                    await _cancel(d_task)
                    return self._prefill_failure(p_task.result(), p.node_id)
            outcome = await d_task
        except BaseException:
            await _cancel(d_task)
            raise
        if isinstance(outcome, Opened):
            return outcome
        status, body, detail = outcome
        if p is not None and _error_code(body) == "prefill_unreachable":
            return self._transfer_failure(p, status, body)  # D named the culprit: no need to wait for P
        if p is not None and p_task is not None:
            await asyncio.wait({p_task}, timeout=PREFILL_SETTLE_S)
            if p_task.done() and not p_task.result().ok:
                return self._prefill_failure(p_task.result(), p.node_id)
        return self._decode_failure(d, status, body, detail)

    async def _open_decode(self, d: Node, path: str, payload: bytes) -> Opened | tuple[int, bytes, str]:
        try:
            response = await self.upstream.open(d.url + path, payload, self.headers)
        except UpstreamError as exc:
            return 0, b"", str(exc)
        try:
            if response.status != 200:
                status, content = response.status, await response.read()
                await response.aclose()
                return status, content, ""
            if not (response.header(b"content-type") or b"").startswith(b"text/event-stream"):
                return Opened(response, await response.read(), None)
            chunks = response.chunks()
            head = await _first_event(chunks)
            if _is_error_event(head):
                await response.aclose()
                return 502, _event_payload(head), ""
            return Opened(response, head, chunks)
        except UpstreamError as exc:
            await response.aclose()
            return 0, b"", str(exc)
        except BaseException:
            await response.aclose()
            raise

    def _prefill_failure(self, result: PrefillResult, p_id: str) -> Failure:
        if result.status == 0:
            message = f"prefill node {p_id} failed: {result.detail}"
            return Failure(
                502,
                error_bytes(502, message, code="prefill_unreachable"),
                True,
                (p_id,),
                "prefill_unreachable",
            )
        retryable = _retryable(result.status)
        return Failure(result.status, result.body, retryable, (p_id,), f"prefill_{result.status}")

    def _transfer_failure(self, p: Node, status: int, body: bytes) -> Failure:
        """D could not reach P for the KV (P gone from the registry, or its transfer endpoint
        refusing, as a restarted node's old one does): P's fault, so the retry goes without P."""
        self.nodes.breaker(p.node_id).failure()
        self.metrics.node_failures.labels(node=p.node_id, kind="prefill").inc()
        return Failure(status, body, True, (p.node_id,), "prefill_unreachable")

    def _decode_failure(self, d: Node, status: int, body: bytes, detail: str) -> Failure:
        if _node_fault(status):
            self.nodes.breaker(d.node_id).failure()
            self.metrics.node_failures.labels(node=d.node_id, kind="decode").inc()
        if status == 0:
            message = f"decode node {d.node_id} failed: {detail}"
            return Failure(
                502,
                error_bytes(502, message, code="decode_unreachable"),
                True,
                (d.node_id,),
                "decode_unreachable",
            )
        return Failure(status, body, _retryable(status), (d.node_id,), f"decode_{status}")

    async def _relay(
        self, opened: Opened, send: Send, timing: Timing, extra: list[tuple[bytes, bytes]], d: Node
    ) -> None:
        response = opened.response
        try:
            headers = [(k, v) for k, v in response.headers if k not in _HOP_HEADERS] + extra
            if opened.rest is None:
                headers.append((b"content-length", str(len(opened.head)).encode()))
            await send_checked(
                send, {"type": "http.response.start", "status": response.status, "headers": headers}
            )
            await self._chunk(send, opened.head, timing, more=opened.rest is not None)
            if opened.rest is None:
                return
            try:
                async for chunk in opened.rest:
                    await self._chunk(send, chunk, timing, more=True)
            except UpstreamError as exc:
                self.nodes.breaker(d.node_id).failure()
                self.metrics.node_failures.labels(node=d.node_id, kind="decode_stream").inc()
                message = f"decode node {d.node_id} broke the stream: {exc}"
                await send_checked(
                    send,
                    {
                        "type": "http.response.body",
                        "body": sse_error(502, message, "decode_stream_broken"),
                        "more_body": True,
                    },
                )
            await send_checked(send, {"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()
            self.metrics.e2e.observe(time.monotonic() - timing.arrival)

    async def _chunk(self, send: Send, data: bytes, timing: Timing, more: bool) -> None:
        await send_checked(send, {"type": "http.response.body", "body": data, "more_body": more})
        now = time.monotonic()
        if timing.chunks == 0:
            self.metrics.ttft.observe(now - timing.arrival)
        else:
            self.metrics.itl.observe(now - timing.last_chunk)
            if timing.chunks == 1:
                self.metrics.handoff.observe(now - timing.last_chunk)
        timing.chunks += 1
        timing.last_chunk = now

    async def aclose(self) -> None:
        for task in list(self._background):
            task.cancel()
        await self.upstream.aclose()


def node_pool(config: FrontendConfig) -> NodePool:
    """The relay's connections to the nodes: `--connect-timeout` to connect, `--upstream-timeout` per read."""
    return NodePool(config.connect_timeout, config.upstream_timeout)


def with_pd(raw: bytes, nonempty: bool, pd: dict[str, Any]) -> bytes:
    """The client's JSON object `raw` (checked already, without a `pd` key) with `"pd": pd` added last."""
    end = raw.rstrip()
    assert end.endswith(b"}"), "parse_body lets only JSON objects through"
    return b"".join((end[:-1], b',"pd":' if nonempty else b'"pd":', orjson.dumps(pd), b"}"))


def prompt_text(body: dict[str, Any]) -> str:
    """The prompt's text as the policies see it: chat message contents, or the completion prompt."""
    messages = body.get("messages")
    if isinstance(messages, list):
        return "\n".join(_content_text(m.get("content")) for m in messages if isinstance(m, dict))
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return "\n".join(
            p if isinstance(p, str) else " ".join(map(str, p)) if isinstance(p, list) else str(p)
            for p in prompt
        )
    return ""


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only the text ones count
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


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


def _error_code(body: bytes) -> str | None:
    """The `error.code` of an OpenAI-shaped error body, if it has one."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    error = payload.get("error") if isinstance(payload, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else None


def _node_fault(status: int) -> bool:
    """Failures that count against a node's breaker: no answer, or a 5xx other than 'busy' (503)."""
    return status == 0 or (status >= 500 and status != 503)


def _retryable(status: int) -> bool:
    return status == 0 or status == 429 or status >= 500


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def send_checked(send: Send, message: Message) -> None:
    try:
        await send(message)
    except (OSError, RuntimeError) as exc:  # the server's way of saying the client is gone
        raise ClientGone(str(exc)) from exc


async def reply(send: Send, status: int, body: bytes, headers: Headers = ()) -> None:
    """A whole JSON response; ClientGone if the client went away meanwhile."""

    async def checked(message: Message) -> None:
        await send_checked(send, message)

    await send_reply(checked, status, body, headers)
