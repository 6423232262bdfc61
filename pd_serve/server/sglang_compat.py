"""The routes and answers an SGLang router (smg) reads from a worker, beside our own.

- `add_sglang_routes`: `POST /generate` (`sglang_generate`), `GET /model_info` (and `/get_model_info`),
  `/get_load`, `/v1/loads`, `/health_generate`, and `BOOTSTRAP_ROUTE` (`sglang_bootstrap`);
- the answers' shapes, and the fields added to `/server_info`, are `sglang_info`'s.

smg tells runtimes apart by `/v1/models`' `owned_by` (ours is "pd-serve"), then by `/version`
(vLLM's) against `/server_info` (SGLang's): a node must never serve `/version`. None of these routes
runs the model except `/health_generate` on a node that decodes (one token).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from pd_serve.engine.sampling_params import SamplingParams
from pd_serve.openai_errors import ErrorCode
from pd_serve.server.admin import _require_alive
from pd_serve.server.errors import APIError
from pd_serve.server.formatting import JSONResponse
from pd_serve.server.hangup import HangUpWatch
from pd_serve.server.sglang_bootstrap import BOOTSTRAP_ROUTE, bootstrap_info
from pd_serve.server.sglang_generate import GenerateRequest, SGLangServing
from pd_serve.server.sglang_info import sglang_model_info, worker_loads
from pd_serve.server.state import NodeState

HEALTH_GENERATE_TIMEOUT_S = 20.0


def add_sglang_routes(app: FastAPI, state: NodeState, hung_up: Callable[[Request], HangUpWatch]) -> None:
    serving = SGLangServing(state)

    @app.post("/generate", response_model=None)
    async def generate(body: GenerateRequest, request: Request) -> JSONResponse | StreamingResponse:
        return await serving.generate(body, hung_up(request))

    @app.get("/model_info")
    @app.get("/get_model_info")
    async def model_info() -> dict[str, Any]:
        _require_alive(state)
        return sglang_model_info(state)

    @app.get("/get_load")
    async def get_load() -> list[dict[str, Any]]:
        _require_alive(state)
        s = await state.backend.stats()
        used = (s.num_total_pages - s.num_free_pages) * s.page_size
        return [
            {
                "dp_rank": 0,
                "num_reqs": s.num_running + s.num_waiting + s.num_in_transfer,
                "num_waiting_reqs": s.num_waiting,
                "num_tokens": used,
            }
        ]

    @app.get("/v1/loads")
    async def loads() -> dict[str, Any]:
        _require_alive(state)
        return worker_loads(state, await state.backend.stats())

    @app.get("/health_generate")
    async def health_generate() -> JSONResponse:
        _require_alive(state)
        await _generate_one_token(state)
        return JSONResponse({"status": "ok"})

    @app.get(BOOTSTRAP_ROUTE)
    async def bootstrap() -> dict[str, Any]:
        _require_alive(state)
        return bootstrap_info(state)


async def _generate_one_token(state: NodeState) -> None:
    """A prefill node generates only in rooms: there, the engine answering its stats is the check."""
    if state.backend.role == "prefill":
        await asyncio.wait_for(state.backend.stats(), HEALTH_GENERATE_TIMEOUT_S)
        return
    stream = state.backend.generate(
        [0], SamplingParams(max_tokens=1, ignore_eos=True), f"health-{uuid.uuid4().hex}"
    )

    async def drain() -> str | None:
        async for delta in stream:
            if delta.finished:
                return delta.error
        return "the engine ended the request without finishing it"

    try:
        error = await asyncio.wait_for(drain(), HEALTH_GENERATE_TIMEOUT_S)
    except asyncio.TimeoutError:
        error = f"no token within {HEALTH_GENERATE_TIMEOUT_S} s"
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
    if error is not None:
        raise APIError(
            503,
            f"the engine could not generate: {error}",
            code=ErrorCode.ENGINE_UNAVAILABLE,
            headers={"Retry-After": "1"},
        )
