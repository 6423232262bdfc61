"""Where a tokenized request goes: the `NodeBackend` interface and its colocated implementation.

Call order: `start()` once (returns the engine's info: layout, max_model_len, model_dir, config),
then any number of concurrent `generate()`s, `stats()`, `flush_cache()`, profile calls, `leave()`
(a drain: no new work offered, what is in flight goes on), and `shutdown()` once, which ends every
open `generate()` with a finished delta. `generate()` yields `RequestDelta`s until the finished one;
closing it early aborts the request and frees its pages.

The prefill and decode roles implement the same interface; a request's `pd` object (room and pair)
reaches them through `check_pd()` (before any work is done) and `generate(..., pd=...)`. The
colocated node has no peer, so it refuses `pd` there. A backend never parses HTTP or formats
responses.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from pd_serve.config import DisaggConfig, EngineConfig
from pd_serve.engine.messages import EngineReady, EngineStats, RequestDelta
from pd_serve.engine.sampling_params import SamplingParams
from pd_serve.server.errors import bad_request
from pd_serve.server.schemas import PDParams


class NodeBackend(Protocol):
    role: str

    async def start(self) -> EngineReady: ...

    async def join(self) -> None:
        """Start being offered work (join the bootstrap registry): once the whole node is ready."""

    async def shutdown(self) -> None: ...

    async def leave(self) -> None:
        """Stop being offered new work (leave the bootstrap registry); requests in flight go on."""

    @property
    def alive(self) -> bool: ...

    @property
    def engine_pid(self) -> int | None: ...

    def check_pd(self, pd: PDParams | None) -> None:
        """Raise APIError if this node cannot serve a request with this `pd` (or without one)."""

    def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str, pd: PDParams | None = None
    ) -> AsyncIterator[RequestDelta]: ...

    async def stats(self) -> EngineStats: ...

    async def flush_cache(self) -> int: ...

    async def start_profile(self, directory: str) -> None: ...

    async def stop_profile(self) -> str: ...


class ColocatedBackend:
    """One engine process doing prefill and decode, reached through `EngineClient`."""

    role = "colocated"

    def __init__(self, config: EngineConfig, disagg: DisaggConfig | None = None) -> None:
        """`disagg`: the prefill and decode roles' engine, which also runs a transfer engine."""
        from pd_serve.engine.client import EngineClient

        self.client = EngineClient(config, disagg=disagg)

    async def start(self) -> EngineReady:
        return await self.client.start()

    async def shutdown(self) -> None:
        await self.client.shutdown()

    async def join(self) -> None:
        return None  # in no registry: the frontend's /health probe finds the node

    async def leave(self) -> None:
        return None  # in no registry: the frontend's /health probe sees the drain

    @property
    def alive(self) -> bool:
        return self.client.alive

    @property
    def engine_pid(self) -> int | None:
        return self.client.pid

    def check_pd(self, pd: PDParams | None) -> None:
        if pd is not None:
            raise bad_request(
                "pd",
                "this is a colocated node: it serves whole requests and takes no 'pd' object; "
                "send disaggregated requests to a prefill or decode node",
            )

    def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str, pd: PDParams | None = None
    ) -> AsyncIterator[RequestDelta]:
        self.check_pd(pd)
        return self.client.generate(request_id, prompt_ids, params)

    async def stats(self) -> EngineStats:
        try:
            return await self.client.stats()
        except TimeoutError:
            if self.client.last_stats is None:
                raise
            return self.client.last_stats

    async def flush_cache(self) -> int:
        return await self.client.flush_cache()

    async def start_profile(self, directory: str) -> None:
        await self.client.start_profile(directory)

    async def stop_profile(self) -> str:
        return await self.client.stop_profile()
