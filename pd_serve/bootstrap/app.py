"""The bootstrap rendezvous service: a FastAPI app (served by Granian) over one node store.

Nodes register here; decode nodes find their prefill peer's transfer endpoint here; the frontend
learns which nodes exist and which pairs are compatible. It never talks to nodes itself.

HTTP API (JSON bodies; with a token configured every route but /health needs
`Authorization: Bearer <token>`, else 401). A record (`NodeRecord`) is:

    {"role": "prefill" | "decode" | "colocated",
     "http_url": "http://10.0.0.5:8100",
     "transfer": [{"backend": "ucx", "address": "10.0.0.5:17000"}, ...],   # index = TP rank
     "layout": {"architecture": "LlamaForCausalLM", "num_layers": 16, "num_kv_heads": 8,
                "head_dim": 64, "dtype": "bfloat16", "page_size": 16, "config_hash": "ab12..."},
     "capacity": {"total_pages": 4096, "max_running_requests": 256},
     "load": {"running": 3, "waiting": 0, "free_pages": 3900},
     "node_id": "prefill-0",
     "registered_at": 1718000000.1, "updated_at": 1718000004.2, "expires_at": 1718000014.2}

`node_id` is 1-128 characters of [A-Za-z0-9._-] starting with a letter or digit (else 422, field
"node_id"). Times are Unix seconds from the replica's clock.

- `PUT /v1/nodes/{node_id}`, body = the record's first six fields (`load` optional, zeros; `transfer`
  may be empty only for colocated). 201 + record for a new registration, 200 + record for a refresh
  (same body but `load`, which keeps `registered_at`).
- `POST /v1/nodes/{node_id}/heartbeat`, optional body `{"load": {...}}`: 200 + record with a new
  `expires_at`; 404 when unknown or expired (the client then registers again).
- `DELETE /v1/nodes/{node_id}`: 204; 404 when unknown.
- `GET /v1/nodes[?role=R]`: 200 `{"nodes": [record, ...], "etag": "<tag>"}` sorted by node_id, and
  header `ETag: "<tag>"`. The tag changes on a join, leave, expiry or re-registration, not on heartbeats.
  `&wait=<tag>&timeout=S` (tag bare or quoted; S <= 60, default 30) answers as soon as the tag differs from `wait`, or after
  S seconds with the unchanged list; a change through this replica wakes it at once; one through
  another replica, or an expiry, within 1.5 x the poll interval (0.5 s).
- `GET /v1/nodes/{node_id}`: 200 + record; 404 when unknown or expired.
- `GET /v1/pairs/check?prefill=ID&decode=ID`: 200 `{"compatible": bool, "prefill": ID, "decode": ID,
  "field": null | "role" | "layout.<name>" | "tp_size", "prefill_value": ..., "decode_value": ...,
  "reason": null | str}`; `field` is the first difference (roles, then layout fields in order, then the
  number of transfer endpoints). 404 naming the node that is unknown.
- `GET /health`: 200 `{"status": "ok", "store": "memory" | "redis"}`; 503 `"status": "store unreachable"`.
- `GET /metrics`: Prometheus text (pd_bootstrap_nodes{role}, *_registrations_total{kind},
  *_heartbeats_total, *_expiries_total, *_requests_total{method,route,status}).

Errors: `{"detail": str}`; 422 adds `"errors": [{"field": "layout.page_size", "message": str}]` and
its detail starts with the first field. 413 for bodies over 64 KiB, 507 when --max-nodes is reached.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Body, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from pd_serve.bootstrap.config import BootstrapConfig
from pd_serve.bootstrap.metrics import BootstrapMetrics
from pd_serve.bootstrap.middleware import guard
from pd_serve.bootstrap.records import (
    NODE_ID_PATTERN,
    HeartbeatBody,
    NodeList,
    NodeRecord,
    NodeRegistration,
    Role,
    check_pair,
)
from pd_serve.bootstrap.registry import Registry
from pd_serve.bootstrap.store import NodeNotFound, StoreFull
from pd_serve.http_common import GuardMiddleware
from pd_serve.metrics_common import CONTENT_TYPE

log = logging.getLogger("pd_serve.bootstrap")
MAX_WAIT_TIMEOUT = 60.0  # seconds: the longest long-poll a caller may ask for
NodeId = Annotated[str, Path(pattern=NODE_ID_PATTERN, max_length=128)]
WaitTimeout = Annotated[float, Query(ge=0, le=MAX_WAIT_TIMEOUT)]


def _json(model: NodeRecord | NodeList, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        model.model_dump_json(), status_code=status, media_type="application/json", headers=headers
    )


def _not_found(detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=404)


def _field_of(loc: tuple[int | str, ...], kind: str) -> str:
    if kind == "json_invalid":
        return "body"
    parts = (
        [str(p) for p in loc[1:]]
        if loc and loc[0] in ("body", "path", "query", "header")
        else list(map(str, loc))
    )
    return ".".join(parts) or str(loc[0] if loc else "body")


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"field": _field_of(tuple(e.get("loc", ())), e.get("type", "")), "message": e.get("msg", "invalid")}
        for e in exc.errors()
    ]
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return JSONResponse({"detail": detail, "errors": errors}, status_code=422)


def create_app(config: BootstrapConfig) -> GuardMiddleware:
    """The ASGI app for one replica: the FastAPI routes wrapped in the auth/size/metrics guard."""
    metrics = BootstrapMetrics()
    registry = Registry(config, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await registry.store.start()
        log.info(
            "bootstrap listening on %s:%d, store %s, node ttl %gs, auth %s",
            config.host,
            config.port,
            config.store_display,
            config.node_ttl,
            "on" if config.auth_token else "off",
        )
        try:
            yield
        finally:
            await registry.store.close()

    app = FastAPI(title="pd-serve bootstrap", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_exception_handler(RequestValidationError, _validation_error)
    _add_node_routes(app, registry)
    _add_query_routes(app, registry)
    return guard(app, config.auth_token, config.max_body_bytes, metrics)


def _add_node_routes(app: FastAPI, registry: Registry) -> None:
    store, metrics = registry.store, registry.metrics

    @app.put("/v1/nodes/{node_id}")
    async def put_node(node_id: NodeId, registration: NodeRegistration) -> Response:
        try:
            result = await store.put(node_id, registration)
        except StoreFull as exc:
            return JSONResponse({"detail": str(exc)}, status_code=507)
        metrics.registrations.labels(kind="new" if result.created else "refresh").inc()
        if result.created:
            registry.changed()
            log.info("node %s registered (%s, %s)", node_id, registration.role, registration.http_url)
        return _json(result.record, status=201 if result.created else 200)

    @app.post("/v1/nodes/{node_id}/heartbeat")
    async def heartbeat(node_id: NodeId, body: Annotated[HeartbeatBody | None, Body()] = None) -> Response:
        try:
            record = await store.heartbeat(node_id, body.load if body else None)
        except NodeNotFound:
            return _not_found(
                f"node {node_id!r} is unknown or expired: register it again (PUT /v1/nodes/{node_id})"
            )
        metrics.heartbeats.inc()
        return _json(record)

    @app.delete("/v1/nodes/{node_id}")
    async def delete_node(node_id: NodeId) -> Response:
        if not await store.delete(node_id):
            return _not_found(f"node {node_id!r} is unknown or expired")
        registry.changed()
        log.info("node %s left", node_id)
        return Response(status_code=204)

    @app.get("/v1/nodes/{node_id}")
    async def get_node(node_id: NodeId) -> Response:
        record = await store.get(node_id)
        return _json(record) if record else _not_found(f"node {node_id!r} is unknown or expired")


def _add_query_routes(app: FastAPI, registry: Registry) -> None:
    store, config = registry.store, registry.config

    @app.get("/v1/nodes")
    async def list_nodes(
        role: Role | None = None,
        wait: str | None = None,
        timeout: WaitTimeout = 30.0,
    ) -> Response:
        if wait is None:
            listing = await registry.listing(role)
        else:
            listing = await registry.wait_for_change(role, _bare_etag(wait), timeout)
        return _json(listing, headers={"ETag": f'"{listing.etag}"'})

    @app.get("/v1/pairs/check")
    async def pair_check(
        prefill: Annotated[str, Query(max_length=128)], decode: Annotated[str, Query(max_length=128)]
    ) -> Response:
        p, d = await store.get(prefill), await store.get(decode)
        if p is None or d is None:
            missing = " and ".join(
                f"{k} node {v!r}" for k, v, r in (("prefill", prefill, p), ("decode", decode, d)) if r is None
            )
            return _not_found(f"{missing}: unknown or expired")
        return Response(check_pair(p, d).model_dump_json(), media_type="application/json")

    @app.get("/health")
    async def health() -> JSONResponse:
        kind = "memory" if config.store == "memory" else "redis"
        if await store.ping():
            return JSONResponse({"status": "ok", "store": kind})
        return JSONResponse({"status": "store unreachable", "store": kind}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(registry.metrics.render(await store.list()), media_type=CONTENT_TYPE)


def _bare_etag(value: str) -> str:
    value = value.strip()
    if value.startswith("W/"):
        value = value[2:]
    return value.strip('"')
