"""The guard in front of every node route: API key, body size limit, request counts.

The mechanics are `pd_serve.http_common.GuardMiddleware`; this module gives it what is the node's
own: OpenAI-shaped refusals, `/health` and `/metrics` open (probes and scrapers carry no key), and
counts labelled by route template and status. The key is never echoed or logged.
"""

from __future__ import annotations

import orjson

from pd_serve.http_common import ASGIApp, GuardMiddleware, error_body
from pd_serve.server.metrics import NodeMetrics

OPEN_PATHS = frozenset({"/health", "/metrics"})
_UNAUTHORIZED = "missing or wrong API key: send 'Authorization: Bearer <key>' with the node's --api-key"


def guard(app: ASGIApp, api_key: str | None, max_body_bytes: int, metrics: NodeMetrics) -> GuardMiddleware:
    """`app` behind the API key (when set), the `max_body_bytes` limit and request counting."""

    def count(method: str, route: str, status: str) -> None:
        metrics.requests.labels(route=route, status=status).inc()

    too_large = f"the request body is over the limit of {max_body_bytes} bytes (--max-request-bytes)"
    return GuardMiddleware(
        app,
        api_key,
        max_body_bytes,
        count,
        open_paths=OPEN_PATHS,
        unauthorized=orjson.dumps(error_body(401, _UNAUTHORIZED, code="invalid_api_key")),
        too_large=orjson.dumps(error_body(413, too_large, code="request_too_large")),
    )
