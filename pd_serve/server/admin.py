"""The node's admin sidecar routes: health, metrics, server info, cache flush and the profiler.

`/health` is 200 while the engine lives and the node is not draining; `/server_info` reports the
engine's layout, transfer endpoint, pages and the idle counters (`idle_counters`: what must be back
at its idle value once nothing runs, the no-leak check); `/flush_cache` and the profile routes pass
through to the backend. Every refusal is an `APIError`; none of these routes runs the model.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response

from pd_serve.engine.messages import EngineStats
from pd_serve.metrics_common import CONTENT_TYPE
from pd_serve.openai_errors import ErrorCode
from pd_serve.server.errors import APIError
from pd_serve.server.formatting import JSONResponse
from pd_serve.server.sglang_info import sglang_server_info
from pd_serve.server.state import NodeState

DEFAULT_PROFILE_DIR = "/tmp/pd-serve-profiles"


def add_admin_routes(app: FastAPI, state: NodeState) -> None:
    @app.get("/health")
    async def health() -> JSONResponse:
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503, headers={"Retry-After": "1"})
        if state.backend.alive:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "engine not alive"}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        stats = await state.backend.stats() if state.backend.alive else None
        state.metrics.update_engine(stats, state.backend.alive)
        state.metrics.update_node(state.admission.in_flight, state.open_streams)
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/server_info")
    async def server_info() -> dict[str, Any]:
        _require_alive(state)
        stats = await state.backend.stats()
        info = state.info
        assert info is not None  # alive: started
        return sglang_server_info(state, stats) | {  # ours win: SGLang's fields only fill in
            "role": state.backend.role,
            "model": state.model_name,
            "model_dir": info.model_dir,
            "engine_pid": state.backend.engine_pid,
            "max_model_len": state.max_model_len,
            "memory": info.memory,  # weights_bytes, kv_cache_bytes
            "layout": info.layout.to_dict(),
            "transfer_endpoint": info.transfer_endpoint,
            "transfer_backend": info.transfer_backend,  # as configured: auto, cma, ucx or tcp
            "transfer_backends": info.transfer_backends,  # the planes it offers, best first
            "transfer_peers": stats.transfer_peers,  # each open transfer connection and its plane
            "engine_config": asdict(state.engine_config),
            "server_config": state.config.public_dict(),
            "pages": {
                "total": stats.num_total_pages,
                "free": stats.num_free_pages,
                "used": stats.num_total_pages - stats.num_free_pages,
                "cached": stats.num_cached_pages,
                "page_size": stats.page_size,
            },
            "stats": asdict(stats),
            "in_flight": state.admission.in_flight,
            "admission_limit": state.admission.limit,
            "draining": state.draining,
            "idle": idle_counters(state, stats),
        }

    @app.post("/flush_cache")
    async def flush_cache() -> dict[str, Any]:
        _require_alive(state)
        return {"freed_pages": await state.backend.flush_cache()}

    @app.post("/start_profile")
    async def start_profile(request: Request) -> dict[str, Any]:
        _require_alive(state)
        body = await _optional_json(request)
        directory = body.get("output_dir") or state.config.profile_dir or DEFAULT_PROFILE_DIR
        if not isinstance(directory, str):
            raise APIError(400, "output_dir must be a string (a directory path)", param="output_dir")
        directory = os.path.abspath(directory)
        try:
            await state.backend.start_profile(directory)
        except RuntimeError as exc:
            raise APIError(400, str(exc), param="output_dir", code=ErrorCode.PROFILE_STATE) from exc
        return {"status": "profiling", "output_dir": directory}

    @app.post("/stop_profile")
    async def stop_profile() -> dict[str, Any]:
        _require_alive(state)
        try:
            trace = await state.backend.stop_profile()
        except RuntimeError as exc:
            raise APIError(400, str(exc), code=ErrorCode.PROFILE_STATE) from exc
        return {"status": "stopped", "trace": trace}


def idle_counters(state: NodeState, stats: EngineStats) -> dict[str, int]:
    """What must be back at its idle value once the node has nothing to do (the no-leak check):
    free pages equal to total pages (cached pages count as free), every other value 0."""
    transfer = stats.transfer
    return {
        "pages_total": stats.num_total_pages,
        "pages_free": stats.num_free_pages,
        "engine_requests": stats.num_requests,
        "running": stats.num_running,
        "waiting": stats.num_waiting,
        "rooms": stats.num_in_transfer,
        "transfer_live_senders": transfer.get("live_senders", 0),
        "transfer_live_receivers": transfer.get("live_receivers", 0),
        "transfer_pending_room_requests": transfer.get("pending_room_requests", 0),
        "http_in_flight": state.admission.in_flight,
        "open_streams": state.open_streams,
    }


def _require_alive(state: NodeState) -> None:
    if not state.backend.alive:
        raise APIError(503, "the engine is not alive", code=ErrorCode.ENGINE_UNAVAILABLE, headers={"Retry-After": "1"})


async def _optional_json(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = orjson.loads(raw)
    except ValueError as exc:
        raise APIError(400, f"the body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object")
    return body
