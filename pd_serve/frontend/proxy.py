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

Beside it: `answers` reads each node's answer just far enough to decide, `failures` turns a lost
attempt into a `Failure` (status, body, blame), `downstream` sends to the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from typing import Any

import httpx
import orjson

from pd_serve.aio import TaskSet
from pd_serve.frontend.answers import Answer, Opened, error_code, open_decode, post_prefill
from pd_serve.frontend.config import FrontendConfig
from pd_serve.frontend.downstream import reply, send_checked
from pd_serve.frontend.errors import RETRY_AFTER_S, error_bytes, sse_error
from pd_serve.frontend.failures import Failure, failure_of, node_fault
from pd_serve.frontend.limits import prompt_text
from pd_serve.frontend.metrics import FrontendMetrics, Timing
from pd_serve.frontend.node_pool import NodePool
from pd_serve.frontend.nodes import Node, NodeSet
from pd_serve.frontend.queueing import DecodeQueue, wait_turn_or_503
from pd_serve.frontend.router import Choice, NoPair, Router
from pd_serve.frontend.upstream import Upstream, UpstreamError, as_upstream
from pd_serve.http_common import Send
from pd_serve.openai_errors import ErrorCode

log = logging.getLogger(__name__)
PREFILL_SETTLE_S = 0.2  # after D failed: how long to wait for P's verdict before blaming D
_HOP_HEADERS = frozenset(
    {b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"date", b"server"}
)


class Relay:
    def __init__(
        self,
        config: FrontendConfig,
        nodes: NodeSet,
        router: Router,
        upstream: Upstream | httpx.AsyncClient,
        metrics: FrontendMetrics,
        queue: DecodeQueue | None = None,
    ) -> None:
        self.config = config
        self.queue = queue
        self.nodes = nodes
        self.router = router
        self.upstream = as_upstream(upstream)
        self.metrics = metrics
        self.headers = [(b"content-type", b"application/json")] + [
            (k.lower().encode(), v.encode()) for k, v in config.node_headers.items()
        ]
        self._background = TaskSet()  # P's requests that outlive their attempt

    async def serve(self, path: str, body: dict[str, Any], raw: bytes, send: Send) -> None:
        """Answer one OpenAI generation request through `send` (ASGI), retrying as the module says."""
        timing = Timing()
        if self.queue is not None and not await wait_turn_or_503(self.queue, self.metrics, send):
            return
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
                        error_bytes(503, str(exc), code=ErrorCode.NO_PAIR),
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
        p_task: asyncio.Task[Answer] | None = None
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
        d_task = asyncio.create_task(open_decode(self.upstream, d.url + path, d_body, self.headers))
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
                    self._background.keep(p_task)  # P's answer is only bookkeeping now; let it land
                else:
                    p_task.cancel()

    async def _prefill(self, p: Node, path: str, payload: bytes) -> Answer:
        """P's request; records P's breaker verdict and always releases its load guard."""
        breaker = self.nodes.breaker(p.node_id)
        self.metrics.node_requests.labels(node=p.node_id, role=p.role).inc()
        with self.nodes.load.acquire(p.node_id):
            try:
                answer = await post_prefill(self.upstream, p.url + path, payload, self.headers)
            except asyncio.CancelledError:
                breaker.release()
                raise
        if answer.ok:
            breaker.success()
        elif node_fault(answer.status):
            self._fault(p, "prefill")
        else:
            breaker.release()
        return answer

    def _fault(self, node: Node, kind: str) -> None:
        """A failure of `node` that counts against its breaker (`kind`: the failures metric label)."""
        self.nodes.breaker(node.node_id).failure()
        self.metrics.node_failures.labels(node=node.node_id, kind=kind).inc()

    async def _open(
        self,
        d: Node,
        p: Node | None,
        d_task: asyncio.Task[Opened | Answer],
        p_task: asyncio.Task[Answer] | None,
    ) -> Opened | Failure:
        """D's status and first event, raced against P failing; a Failure when the attempt is lost."""
        try:
            if p is not None and p_task is not None:
                await asyncio.wait({d_task, p_task}, return_when=asyncio.FIRST_COMPLETED)
                if not d_task.done() and not p_task.result().ok:
                    await _cancel(d_task)
                    return failure_of(p_task.result(), "prefill", p.node_id)
            outcome = await d_task
        except BaseException:
            await _cancel(d_task)
            raise
        if isinstance(outcome, Opened):
            return outcome
        if p is not None and error_code(outcome.body) == ErrorCode.PREFILL_UNREACHABLE:
            # D could not reach P for the KV (P gone from the registry, or its transfer endpoint
            # refusing, as a restarted node's old one does): P's fault, the retry goes without P
            self._fault(p, "prefill")  # D named the culprit: no need to wait for P
            return Failure(outcome.status, outcome.body, True, (p.node_id,), ErrorCode.PREFILL_UNREACHABLE)
        if p is not None and p_task is not None:
            await asyncio.wait({p_task}, timeout=PREFILL_SETTLE_S)
            if p_task.done() and not p_task.result().ok:
                return failure_of(p_task.result(), "prefill", p.node_id)
        if node_fault(outcome.status):
            self._fault(d, "decode")
        return failure_of(outcome, "decode", d.node_id)

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
                self._fault(d, "decode_stream")
                message = f"decode node {d.node_id} broke the stream: {exc}"
                await send_checked(
                    send,
                    {
                        "type": "http.response.body",
                        "body": sse_error(502, message, ErrorCode.DECODE_STREAM_BROKEN),
                        "more_body": True,
                    },
                )
            await send_checked(send, {"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()
            self.metrics.e2e.observe(time.monotonic() - timing.arrival)

    async def _chunk(self, send: Send, data: bytes, timing: Timing, more: bool) -> None:
        await send_checked(send, {"type": "http.response.body", "body": data, "more_body": more})
        timing.chunk_sent(self.metrics)

    async def aclose(self) -> None:
        self._background.cancel_all()
        await self.upstream.aclose()


def node_pool(config: FrontendConfig) -> NodePool:
    """The relay's connections to the nodes: `--connect-timeout` to connect, `--upstream-timeout` per read."""
    return NodePool(config.connect_timeout, config.upstream_timeout)


def with_pd(raw: bytes, nonempty: bool, pd: dict[str, Any]) -> bytes:
    """The client's JSON object `raw` (checked already, without a `pd` key) with `"pd": pd` added last."""
    end = raw.rstrip()
    assert end.endswith(b"}"), "parse_body lets only JSON objects through"
    return b"".join((end[:-1], b',"pd":' if nonempty else b'"pd":', orjson.dumps(pd), b"}"))


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
