"""The node's FastAPI app: OpenAI routes, health, metrics and the admin sidecar.

`create_app(state)` builds it around a `NodeState`; the ASGI lifespan starts the state (engine
process and tokenizer) and stops it. Routes parse and validate, then hand over to
`OpenAIServing`; every error leaves as OpenAI-shaped JSON (`errors.py`), including validation,
routing and unexpected ones (logged here with their stack, never sent).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pd_serve.engine.messages import EngineStats
from pd_serve.http_common import error_body
from pd_serve.metrics_common import CONTENT_TYPE
from pd_serve.server.errors import APIError
from pd_serve.server.formatting import JSONResponse
from pd_serve.server.middleware import PD_PATHS, guard
from pd_serve.server.schemas import ChatCompletionRequest, CompletionRequest, param_from_location
from pd_serve.server.serving import OpenAIServing
from pd_serve.server.state import DRAIN_SIGNAL, DRAINED_SIGNAL, NodeState

log = logging.getLogger(__name__)
DEFAULT_PROFILE_DIR = "/tmp/pd-serve-profiles"
SUPERVISOR_POLL_S = 0.5


def create_app(state: NodeState) -> Any:
    # DRAIN_SIGNALs from here to the lifespan's handler are kept for it. The worker starts with the
    # signal blocked (by its supervisor, `_drain_before_stop`): unblocked, one sent before now arrives.
    # Not on the main thread (an embedded server): signal.signal raises, and nothing changes.
    early: list[int] = []
    with contextlib.suppress(ValueError):
        signal.signal(DRAIN_SIGNAL, lambda signum, _: early.append(signum))
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {DRAIN_SIGNAL})

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        supervisor = os.getppid()  # Granian's supervisor, which sends DRAIN_SIGNAL
        loop = asyncio.get_running_loop()
        drain_signals: list[int] = []  # DRAIN_SIGNALs received: only then does the supervisor wait to be told
        started = False

        def on_drain_signal() -> None:
            drain_signals.append(DRAIN_SIGNAL)
            if started:  # one while the engine starts is served once it has started
                _background_drain(state, supervisor)

        loop.add_signal_handler(DRAIN_SIGNAL, on_drain_signal)
        drain_signals += early  # final now: the handler above replaced the one that fills it
        await state.start()
        started = True
        for _signal in drain_signals:  # a SIGTERM came while starting: drain (nothing in flight) and stop
            _background_drain(state, supervisor)
        orphan_watch = loop.create_task(_stop_without_supervisor(state, supervisor))
        try:
            yield
        finally:
            orphan_watch.cancel()
            await state.stop()
            if drain_signals:  # stopped on its own during a drain (a signal to the whole group); not
                # when the supervisor stopped this worker unasked (Granian's SIGHUP reload): that
                # DRAINED_SIGNAL would stop the whole node
                _tell_supervisor(state, supervisor)

    app = FastAPI(title="pd-serve node", lifespan=lifespan, default_response_class=JSONResponse)
    app.state.node = state
    serving = OpenAIServing(state)
    _add_error_handlers(app)
    _add_openai_routes(app, state, serving)
    _add_admin_routes(app, state)
    counted = CountGenerations(app, state)
    return guard(counted, state.config.api_key, state.config.max_request_bytes, state.metrics, state.config.cluster_token)


class CountGenerations:
    """Counts the generation requests in flight (`state.generations`), from arrival to the end of
    their response (stream or not), so that a drain knows when they are all done. One that arrives
    while the node drains is not counted: it gets its 503 at once."""

    def __init__(self, app: Any, state: NodeState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") not in PD_PATHS or self.state.draining:
            await self.app(scope, receive, send)
            return
        self.state.generations += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.generations -= 1


_DRAINS: set[asyncio.Task[None]] = set()


def _background_drain(state: NodeState, supervisor: int) -> None:
    task = asyncio.get_running_loop().create_task(_drain(state, supervisor))
    _DRAINS.add(task)  # the loop keeps only weak references to tasks
    task.add_done_callback(_DRAINS.discard)


async def _drain(state: NodeState, supervisor: int) -> None:
    """The first DRAIN_SIGNAL drains for --drain-timeout (0: aborts at once); a second one aborts what
    is left. With a timeout the supervisor waits to be told (DRAINED_SIGNAL) before it stops this
    worker; with 0 it stops it at once, as Granian does."""
    await state.drain(state.config.drain_timeout)
    _tell_supervisor(state, supervisor)


async def _stop_without_supervisor(state: NodeState, supervisor: int) -> None:
    """Granian's worker outlives a supervisor killed with SIGKILL and goes on serving, with the port,
    the engine and its GPU memory, and nothing left to stop it. Stop as on SIGTERM instead (aborting
    what is in flight: nobody will wait for a drain), through Granian's own stop."""
    while os.getppid() == supervisor:
        await asyncio.sleep(SUPERVISOR_POLL_S)
    log.warning("the supervisor (pid %d) is gone: aborting the requests in flight and stopping", supervisor)
    await state.drain()
    os.kill(os.getpid(), signal.SIGTERM)


def _tell_supervisor(state: NodeState, supervisor: int) -> None:
    """Once: the end of each drain call and of the lifespan would each tell it."""
    if state.config.drain_timeout > 0 and not state.told_supervisor and os.getppid() == supervisor:
        state.told_supervisor = True
        os.kill(supervisor, DRAINED_SIGNAL)


async def _client_gone(request: Request) -> None:
    """Returns once the client has hung up: after the body, the ASGI receive yields only that."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _add_openai_routes(app: FastAPI, state: NodeState, serving: OpenAIServing) -> None:
    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
        return await serving.chat(body, lambda: _client_gone(request))

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
        return await serving.completions(body, lambda: _client_gone(request))

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {
            "id": state.model_name,
            "object": "model",
            "created": int(state.started_at),
            "owned_by": "pd-serve",
            "max_model_len": state.max_model_len,
        }
        return {"object": "list", "data": [card]}


def _add_admin_routes(app: FastAPI, state: NodeState) -> None:
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
        return {
            "role": state.backend.role,
            "model": state.model_name,
            "model_dir": state.info.get("model_dir"),
            "engine_pid": state.backend.engine_pid,
            "max_model_len": state.max_model_len,
            "memory": state.info.get("memory"),  # weights_bytes, kv_cache_bytes
            "layout": state.info.get("layout"),
            "transfer_endpoint": state.info.get("transfer_endpoint"),
            "transfer_backend": state.info.get("transfer_backend"),  # as configured: auto, cma, ucx or tcp
            "transfer_backends": state.info.get("transfer_backends"),  # the planes it offers, best first
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
            raise APIError(400, str(exc), param="output_dir", code="profile_state") from exc
        return {"status": "profiling", "output_dir": directory}

    @app.post("/stop_profile")
    async def stop_profile() -> dict[str, Any]:
        _require_alive(state)
        try:
            trace = await state.backend.stop_profile()
        except RuntimeError as exc:
            raise APIError(400, str(exc), code="profile_state") from exc
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
        raise APIError(503, "the engine is not alive", code="engine_unavailable", headers={"Retry-After": "1"})


async def _optional_json(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        import orjson

        body = orjson.loads(raw)
    except ValueError as exc:
        raise APIError(400, f"the body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object")
    return body


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = tuple(first.get("loc", ()))
        param = param_from_location(loc)
        where = ".".join(str(p) for p in loc if p != "body") or "body"
        message = f"{where}: {first.get('msg', 'invalid request')}"
        return JSONResponse(error_body(400, message, param=param, code="invalid_value"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        body = error_body(500, f"internal error ({type(exc).__name__}); see the server log", code="internal_error")
        return JSONResponse(body, status_code=500)
