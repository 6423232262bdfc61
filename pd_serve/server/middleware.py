"""The guard in front of every node route: API key, body size limit, request counts, and the pd plane.

The mechanics are `pd_serve.http_common.GuardMiddleware`; this module gives it what is the node's
own: OpenAI-shaped refusals, `/health` and `/metrics` open (probes and scrapers carry no key), and
counts labelled by route template and status. The key is never echoed or logged.

A prefill or decode node with a cluster token also runs `ClusterPlane` inside that guard: a request
that carries a top-level `pd` object (it would create a transfer room: receive KV, or send it) and
the internal routes (`/flush_cache`, profiling) need `X-PD-Cluster-Token: <token>`, the header the
frontend sends to every node; without it 401, with a wrong one 403. The header is separate from the
API key so that a client's key, valid for plain requests to a decode node, never opens the pd plane.
SGLang's router fields (`bootstrap_room` ...) open a room as `pd` does, and `Authorization: Bearer
<token>` (what smg sends as a worker's API key) is accepted as the cluster token too.
Only requests without a valid header have their body parsed here, so the frontend's path costs one
constant-time compare.
"""

from __future__ import annotations

import json

import orjson

from pd_serve.cluster_token import CLUSTER_TOKEN_HEADER
from pd_serve.http_common import (
    ASGIApp,
    BodyCut,
    GuardMiddleware,
    Receive,
    Scope,
    Send,
    bearer_value,
    header_value,
    read_body,
    replay,
    reply,
    token_ok,
)
from pd_serve.openai_errors import ErrorCode, error_body
from pd_serve.server.metrics import NodeMetrics
from pd_serve.server.schemas import SGLANG_PD_FIELDS
from pd_serve.server.sglang_bootstrap import BOOTSTRAP_ROUTE

# BOOTSTRAP_ROUTE: open to a decode node without the API key, never without the cluster token
OPEN_PATHS = frozenset({"/health", "/metrics", BOOTSTRAP_ROUTE})
PD_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/generate"})
INTERNAL_PATHS = frozenset({"/flush_cache", "/start_profile", "/stop_profile", BOOTSTRAP_ROUTE})
_UNAUTHORIZED = "missing or wrong API key: send 'Authorization: Bearer <key>' with the node's --api-key"
_HEADER_NAME = "X-PD-Cluster-Token"
_HOW = ("(the cluster token of --cluster-token-file or PD_SERVE_CLUSTER_TOKEN, which the frontend sends; "
        "'Authorization: Bearer <token>' also does, as smg's --api-key)")


def guard(
    app: ASGIApp, api_key: str | None, max_body_bytes: int, metrics: NodeMetrics, cluster_token: str | None = None
) -> GuardMiddleware:
    """`app` behind the API key (when set), the `max_body_bytes` limit, request counting and, with a
    `cluster_token`, the pd plane check."""

    def count(method: str, route: str, status: str) -> None:
        metrics.requests.labels(route=route, status=status).inc()

    too_large = f"the request body is over the limit of {max_body_bytes} bytes (--max-request-bytes)"
    inner = ClusterPlane(app, cluster_token, max_body_bytes) if cluster_token else app
    return GuardMiddleware(
        inner,
        api_key,
        max_body_bytes,
        count,
        open_paths=OPEN_PATHS,
        unauthorized=orjson.dumps(error_body(401, _UNAUTHORIZED, code=ErrorCode.INVALID_API_KEY)),
        too_large=orjson.dumps(error_body(413, too_large, code=ErrorCode.REQUEST_TOO_LARGE)),
    )


class ClusterPlane:
    """Refuses pd requests and internal routes that lack the cluster token (see the module docstring)."""

    def __init__(self, app: ASGIApp, token: str, max_body_bytes: int) -> None:
        self.app = app
        self._token = token.encode()
        self._max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or (path not in PD_PATHS and path not in INTERNAL_PATHS):
            await self.app(scope, receive, send)
            return
        given = header_value(scope, CLUSTER_TOKEN_HEADER.encode())
        if token_ok(given, self._token) or token_ok(bearer_value(scope), self._token):
            await self.app(scope, receive, send)
            return
        given = bearer_value(scope) if given is None else given  # a wrong token is 403, a missing one 401
        if path in INTERNAL_PATHS:
            await _refuse(send, given, f"{path} is internal to the cluster")
            return
        try:  # the outer guard has read the body already: this is its replay, in memory
            body = await read_body(receive, self._max_body_bytes) or b""
        except BodyCut as cut:
            body = cut.partial
        if carries_pd(body):
            what = "a request with 'pd' or bootstrap_* (a KV transfer room) may come only from the frontend or smg"
            await _refuse(send, given, what)
            return
        await self.app(scope, replay(body, receive), send)


def carries_pd(body: bytes) -> bool:
    """True when the body is a JSON object with a top-level `pd` key, or one of SGLang's router fields
    (any value, null included).

    What orjson refuses is parsed again the way the app parses bodies (the standard library, which
    also takes NaN and Infinity), so no body reaches the app with a `pd` this check did not see."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        try:
            parsed = json.loads(body)
        except ValueError:
            return False  # the app answers 400 for it; it cannot open a room
    return isinstance(parsed, dict) and any(key in parsed for key in ("pd", *SGLANG_PD_FIELDS))


async def _refuse(send: Send, given: bytes | None, what: str) -> None:
    if given is None:
        status, code, problem = 401, ErrorCode.MISSING_CLUSTER_TOKEN, f"header {_HEADER_NAME} is missing"
    else:
        status, code, problem = 403, ErrorCode.INVALID_CLUSTER_TOKEN, f"header {_HEADER_NAME} does not hold the cluster token"
    body = error_body(status, f"{what}: {problem} {_HOW}", param="pd" if "pd" in what else None, code=code)
    if status == 403:
        body["error"]["type"] = "permission_error"
    await reply(send, status, orjson.dumps(body))
