"""The node's FastAPI app: OpenAI routes, the lifespan with its drain signals, and error handlers;
health, metrics and the rest of the admin sidecar are added from `admin.py`, SGLang's routes (smg)
from `sglang_compat.py`.

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
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pd_serve.aio import TaskSet
from pd_serve.openai_errors import ErrorCode, error_body
from pd_serve.server.admin import add_admin_routes
from pd_serve.server.errors import APIError
from pd_serve.server.formatting import JSONResponse
from pd_serve.server.grpc_server import start_grpc_server
from pd_serve.server.middleware import PD_PATHS, guard
from pd_serve.server.schemas import ChatCompletionRequest, CompletionRequest, param_from_location
from pd_serve.server.serving import OpenAIServing
from pd_serve.server.sglang_bootstrap import start_bootstrap_listener
from pd_serve.server.sglang_compat import add_sglang_routes
from pd_serve.server.sglang_pd import with_sglang_pd
from pd_serve.server.state import DRAIN_SIGNAL, DRAINED_SIGNAL, NodeState

log = logging.getLogger(__name__)
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
        bootstrap_port = grpc = None
        try:
            bootstrap_port = await start_bootstrap_listener(state)  # a prefill node's --bootstrap-port
            grpc = await start_grpc_server(state)  # --grpc-port: smg's grpc:// workers
            yield
        finally:
            orphan_watch.cancel()
            if grpc is not None:
                await grpc.close()
            if bootstrap_port is not None:
                await bootstrap_port.close()
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
    add_admin_routes(app, state)
    add_sglang_routes(app, state, lambda request: lambda: _hung_up(request))
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


_DRAINS = TaskSet()


def _background_drain(state: NodeState, supervisor: int) -> None:
    _DRAINS.spawn(_drain(state, supervisor))


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


async def _hung_up(request: Request) -> None:
    """Returns once the client has hung up: after the body, the ASGI receive yields only that."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _add_openai_routes(app: FastAPI, state: NodeState, serving: OpenAIServing) -> None:
    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
        return await serving.chat(with_sglang_pd(body, state.backend.role), lambda: _hung_up(request))

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
        return await serving.completions(with_sglang_pd(body, state.backend.role), lambda: _hung_up(request))

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
        return JSONResponse(error_body(400, message, param=param, code=ErrorCode.INVALID_VALUE), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        body = error_body(500, f"internal error ({type(exc).__name__}); see the server log", code=ErrorCode.INTERNAL_ERROR)
        return JSONResponse(body, status_code=500)
