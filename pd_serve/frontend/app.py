"""The frontend's ASGI app (pure ASGI, no framework on the hot path), served by Granian.

Routes: `POST /v1/chat/completions` and `/v1/completions` (paired and relayed by `proxy.Relay`),
`GET /v1/models` (from any live node), `GET /health` (200 while a compatible pair or a decode node is
live), `GET /metrics` (Prometheus), `GET /nodes` (the node set), `POST /flush_cache` (fanned out to
every node). With `--api-key` (one or several) every route but /health and /metrics needs
`Authorization: Bearer KEY`, KEY any of them (compared in constant time, `KeyRing`). A generation
request then passes, in order: the in-flight limits (`load.Admission`: 503 past
--max-concurrent-requests, 429 past --max-concurrent-per-key, both with Retry-After and before its
body is read), the body size (413), JSON checks (400) and the request limits (`limits`, 400); its
admission slot is released on every path. Every request to a node carries the cluster token
(`X-PD-Cluster-Token`) when one is set.
The lifespan opens the relay's node connections (`proxy.node_pool`), an `httpx.AsyncClient` for
the rest (probes, and /health, /v1/models, /flush_cache, which live in `admin.py`), and starts the
node watcher. Every
error leaves as OpenAI-shaped JSON; an unexpected exception is logged with its stack, never sent.
A generation request runs as a task that is cancelled when the client disconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import httpx
import orjson

from pd_serve.cluster_token import warn_if_open
from pd_serve.frontend.admin import flush_cache, health, models, upstream_client
from pd_serve.frontend.config import FrontendConfig
from pd_serve.frontend.downstream import ClientGone, reply, send_checked
from pd_serve.frontend.errors import RETRY_AFTER_S, error_bytes
from pd_serve.frontend.limits import cap_output, check_limits, param_of, parse_body
from pd_serve.frontend.load import Admission, Refusal
from pd_serve.frontend.metrics import FrontendMetrics
from pd_serve.frontend.nodes import NodeSet, watch_bootstrap, watch_static
from pd_serve.frontend.proxy import Relay, node_pool
from pd_serve.frontend.queueing import DecodeQueue
from pd_serve.frontend.router import Router
from pd_serve.http_common import (
    BEARER_CHALLENGE,
    BodyCut,
    KeyRing,
    Receive,
    Scope,
    Send,
    StatusRecorder,
    bearer_value,
    read_body,
)
from pd_serve.metrics_common import CONTENT_TYPE
from pd_serve.openai_errors import ErrorCode

log = logging.getLogger(__name__)
GENERATE = frozenset({"/v1/chat/completions", "/v1/completions"})
OPEN_PATHS = frozenset({"/health", "/metrics"})
ROUTES = {
    "/v1/chat/completions": "POST",
    "/v1/completions": "POST",
    "/v1/models": "GET",
    "/health": "GET",
    "/metrics": "GET",
    "/nodes": "GET",
    "/flush_cache": "POST",
}
CLIENT_GONE_STATUS = 499


class FrontendApp:
    def __init__(self, config: FrontendConfig) -> None:
        self.config = config
        self.nodes = NodeSet(config)
        self.metrics = FrontendMetrics()
        self.router = Router(config, self.nodes)
        self._keys = KeyRing(config.api_keys)
        self.admission = Admission(config.max_concurrent_requests, config.max_concurrent_per_key)
        self.http: httpx.AsyncClient | None = None
        self.relay: Relay | None = None
        self._watcher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        warn_if_open(log, "frontend", self.config.cluster_token)
        self.http = upstream_client(self.config)
        queue = DecodeQueue(self.config.max_queued_requests, self.config.queue_timeout, self.router.decode_has_room)
        self.nodes.load_listeners.append(queue.wake)
        self.metrics.queue_depth.set_function(lambda: queue.depth)
        self.relay = Relay(self.config, self.nodes, self.router, node_pool(self.config), self.metrics, queue)
        if self.config.bootstrap:
            watcher = watch_bootstrap(self.nodes, self.config.bootstrap, self.config.cluster_token)
        else:
            watcher = watch_static(self.nodes, self.http, self.config.node_headers)
        self._watcher = asyncio.create_task(watcher, name="frontend-node-watch")
        log.info(
            "frontend on %s:%d, policy %s, nodes from %s",
            self.config.host,
            self.config.port,
            self.config.policy,
            self.config.bootstrap or "static lists",
        )

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        if self.relay is not None:
            await self.relay.aclose()
        if self.http is not None:
            await self.http.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        noted = StatusRecorder(send)
        try:
            await self._route(path, scope, receive, noted)
        except ClientGone:
            noted.status = CLIENT_GONE_STATUS
        except Exception:
            log.exception("unexpected error on %s %s", scope["method"], path)
            with contextlib.suppress(ClientGone):
                await reply(
                    noted,
                    500,
                    error_bytes(500, "internal error in the frontend; see its log", code=ErrorCode.INTERNAL_ERROR),
                )
        finally:
            self.metrics.requests.labels(
                route=path if path in ROUTES else "unrouted", status=str(noted.status)
            ).inc()

    async def _route(self, path: str, scope: Scope, receive: Receive, send: Send) -> None:
        method = ROUTES.get(path)
        if method is None:
            await reply(send, 404, error_bytes(404, f"no route {path}", code=ErrorCode.NOT_FOUND))
        elif scope["method"] != method:
            await reply(send, 405, error_bytes(405, f"{path} takes {method}, not {scope['method']}"))
        elif path in OPEN_PATHS or not self._keys:
            await self._serve_route(path, scope, receive, send, None)
        else:
            principal = self._keys.match(bearer_value(scope))
            if principal is None:
                message = (
                    "missing or wrong API key: send 'Authorization: Bearer <key>' with one of the "
                    "frontend's --api-key keys"
                )
                await reply(send, 401, error_bytes(401, message, code=ErrorCode.INVALID_API_KEY), BEARER_CHALLENGE)
            else:
                await self._serve_route(path, scope, receive, send, principal)

    async def _serve_route(self, path: str, scope: Scope, receive: Receive, send: Send, principal: int | None) -> None:
        if path in GENERATE:
            admitted = self.admission.admit(principal)
            if isinstance(admitted, Refusal):
                retry = ((b"retry-after", RETRY_AFTER_S.encode()),)
                await reply(send, admitted.status, error_bytes(admitted.status, admitted.message, code=admitted.code), retry)
                return
            with admitted:
                await self._generate(path, scope, receive, send)
        elif path == "/health":
            await health(self.nodes, send)
        elif path == "/metrics":
            body = self.metrics.render(self.nodes)
            await send_checked(
                send,
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", CONTENT_TYPE.encode())],
                },
            )
            await send_checked(send, {"type": "http.response.body", "body": body})
        elif path == "/nodes":
            admission = {"in_flight": self.admission.total, "by_key": self.admission.snapshot()}
            await reply(send, 200, orjson.dumps({"nodes": self.nodes.describe(), "admission": admission}))
        elif path == "/v1/models":
            assert self.http is not None
            await models(self.nodes, self.http, self.config.node_headers, send)
        else:
            assert self.http is not None
            await flush_cache(self.nodes, self.http, self.config.node_headers, send)

    async def _generate(self, path: str, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            raw = await read_body(receive, self.config.max_request_bytes)
        except BodyCut as exc:
            # also what a malformed body (a bad chunk size) reads as: answer, or Granian sends a bare 500
            with contextlib.suppress(ClientGone):
                message = "the request body ended before it was complete (or its chunked encoding is malformed)"
                await reply(send, 400, error_bytes(400, message, code=ErrorCode.INCOMPLETE_BODY))
            raise ClientGone(str(exc)) from exc
        if raw is None:
            limit = self.config.max_request_bytes
            await reply(
                send,
                413,
                error_bytes(
                    413,
                    f"the request body is over {limit} bytes (--max-request-bytes)",
                    code=ErrorCode.REQUEST_TOO_LARGE,
                ),
            )
            return
        body, problem = parse_body(raw)
        if body is None:
            await reply(send, 400, error_bytes(400, problem, param=param_of(problem), code=ErrorCode.INVALID_VALUE))
            return
        over = check_limits(body, self.config)
        if over is not None:
            await reply(send, 400, error_bytes(400, over.message, param=over.param, code=over.code))
            return
        if cap_output(body, self.config):
            raw = orjson.dumps(body)
        assert self.relay is not None
        work = asyncio.create_task(self.relay.serve(path, body, raw, send))
        gone = asyncio.create_task(_disconnected(receive))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (work, gone):
                if not task.done():
                    task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
            with contextlib.suppress(asyncio.CancelledError):
                await gone
        if gone.done() and not gone.cancelled() and work.cancelled():
            raise ClientGone("client disconnected")


async def _disconnected(receive: Receive) -> None:
    """Returns when the client disconnects (the body was read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def create_app(config: FrontendConfig) -> FrontendApp:
    return FrontendApp(config)
