"""The guard in front of every bootstrap route: bearer auth, the body size limit, request counts.

The mechanics are `pd_serve.http_common.GuardMiddleware`; this module gives it what is bootstrap's
own: `{"detail": str}` refusals, `/health` open to probes, and counts labelled by method, route
template and status. The token never appears in a response or a log line.
"""

from __future__ import annotations

import orjson

from pd_serve.bootstrap.metrics import BootstrapMetrics
from pd_serve.http_common import ASGIApp, GuardMiddleware

OPEN_PATHS = frozenset({"/health"})
_UNAUTHORIZED = (
    "missing or wrong bearer token: send 'Authorization: Bearer <token>' with the cluster token "
    "(--cluster-token-file or PD_SERVE_CLUSTER_TOKEN)"
)


def guard(app: ASGIApp, token: str | None, max_body_bytes: int, metrics: BootstrapMetrics) -> GuardMiddleware:
    """`app` behind auth (when `token` is set), the `max_body_bytes` limit and request counting."""

    def count(method: str, route: str, status: str) -> None:
        metrics.requests.labels(method=method, route=route, status=status).inc()

    too_large = f"request body is over the limit of {max_body_bytes} bytes"
    return GuardMiddleware(
        app,
        token,
        max_body_bytes,
        count,
        open_paths=OPEN_PATHS,
        unauthorized=orjson.dumps({"detail": _UNAUTHORIZED}),
        too_large=orjson.dumps({"detail": too_large}),
    )
