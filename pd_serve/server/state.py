"""Everything one node's app holds between requests, and its start/stop order.

`NodeState.start()` (the ASGI lifespan's startup) starts the backend (the engine process) and loads
the tokenizer at the same time; `drain()` (on `DRAIN_SIGNAL`, sent by the supervisor on SIGINT/SIGTERM,
since the server would otherwise wait for every stream to end on its own) refuses new requests (503,
and /health 503), and then, with `--drain-timeout N` > 0, leaves the bootstrap registry and lets the
generation requests in flight run on for at most N seconds (a second drain call cuts that short)
before it shuts the backend down, so every request still open gets its finished delta ("abort");
`stop()` (the lifespan's shutdown) drains if that has not happened, cutting a drain's wait short,
gives open streams a moment to write their last chunk, and stops the tokenizer thread. `NodeAdmission`
counts engine requests in flight and refuses past `--max-running-requests + --max-queued-requests`
with a 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from pd_serve.config import EngineConfig
from pd_serve.engine.messages import EngineReady
from pd_serve.openai_errors import ErrorCode
from pd_serve.server.backend import NodeBackend
from pd_serve.server.config import ServerConfig
from pd_serve.server.errors import APIError
from pd_serve.server.metrics import NodeMetrics
from pd_serve.server.tokenization import Tokenization

log = logging.getLogger(__name__)
RETRY_AFTER_S = 1
DRAIN_S = 5.0
DRAIN_SIGNAL = signal.SIGUSR1  # supervisor -> API process: stop taking work, drain (again: abort now)
DRAINED_SIGNAL = signal.SIGUSR2  # API process -> supervisor: a --drain-timeout drain is over, stop me
DRAIN_POLL_S = 0.05


class NodeAdmission:
    """Engine requests in flight on this node, against a limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0

    def check(self, n: int) -> None:
        """Raise the 503 if n more would pass the limit (a 400 if n alone passes it: retrying cannot help)."""
        if n > self.limit:
            raise APIError(
                400,
                f"this request needs {n} engine requests (prompts x n), more than this node ever holds: "
                f"{self.limit} (--max-running-requests + --max-queued-requests); send fewer prompts or a smaller n",
                param="n",
                code=ErrorCode.TOO_MANY_CHOICES,
            )
        if self.in_flight + n > self.limit:
            raise APIError(
                503,
                f"the node is full: {self.in_flight} requests in flight, limit {self.limit} "
                "(--max-running-requests + --max-queued-requests); retry later",
                code=ErrorCode.QUEUE_FULL,
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )

    def acquire(self, n: int, force: bool = False) -> Ticket:
        """Take n slots (503 past the limit, unless `force`: a stream whose check already passed)."""
        if not force:
            self.check(n)
        self.in_flight += n
        return Ticket(self, n)


class Ticket:
    """Slots taken by one HTTP request; released one per finished engine request, the rest at the end."""

    def __init__(self, admission: NodeAdmission, n: int) -> None:
        self._admission = admission
        self.held = n

    def release_one(self) -> None:
        if self.held > 0:
            self.held -= 1
            self._admission.in_flight -= 1

    def release_all(self) -> None:
        self._admission.in_flight -= self.held
        self.held = 0


@dataclass(frozen=True)
class EngineLimits:
    """What the engine would refuse, known in the API process so refusals are 400s before any work."""

    max_model_len: int
    kv_capacity_tokens: int  # total pages * page size
    vocab_size: int


def _vocab_size(model_dir: Path, tokenizer_size: int) -> int:
    config = json.loads((model_dir / "config.json").read_text())
    size = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    return int(size) if size else tokenizer_size


@dataclass
class NodeState:
    config: ServerConfig
    engine_config: EngineConfig
    backend: NodeBackend
    metrics: NodeMetrics = field(default_factory=NodeMetrics)
    tokenization: Tokenization | None = None
    info: EngineReady | None = None  # once the engine is ready
    _limits: EngineLimits | None = None
    admission: NodeAdmission = field(default_factory=lambda: NodeAdmission(0))
    draining: bool = False
    open_streams: int = 0
    generations: int = 0  # generation HTTP requests in flight (the app's `CountGenerations` counts them)
    _cut: asyncio.Event = field(default_factory=asyncio.Event)  # set: abort what a drain waits for, now
    _drained: asyncio.Event = field(default_factory=asyncio.Event)
    told_supervisor: bool = False  # DRAINED_SIGNAL sent (the app sends it once)
    started_at: float = field(default_factory=time.time)

    @property
    def model_name(self) -> str:
        from pd_serve.model.source import default_served_name

        return self.config.served_model_name or default_served_name(self.engine_config.model)

    @property
    def limits(self) -> EngineLimits:
        if self._limits is None:
            raise APIError(503, "the node is still starting", code=ErrorCode.STARTING)
        return self._limits

    @property
    def max_model_len(self) -> int:
        return self.limits.max_model_len

    @property
    def tokenizer(self) -> Tokenization:
        if self.tokenization is None:
            raise APIError(503, "the node is still starting", code=ErrorCode.STARTING)
        return self.tokenization

    async def start(self) -> None:
        from pd_serve.model.source import resolve_model_path

        e = self.engine_config
        model_dir = await asyncio.to_thread(resolve_model_path, e.model, e.dtype, e.device, False)
        tok_task = asyncio.create_task(asyncio.to_thread(Tokenization.load, model_dir))
        try:
            self.info = await self.backend.start()
        except BaseException:
            tok_task.cancel()
            raise
        self.tokenization = await tok_task
        stats = await self.backend.stats()
        self._limits = EngineLimits(
            max_model_len=self.info.max_model_len,
            kv_capacity_tokens=stats.num_total_pages * stats.page_size,
            vocab_size=_vocab_size(model_dir, len(self.tokenization.tokenizer)),
        )
        limit = self.engine_config.max_running_requests + self.config.max_queued_requests
        self.admission = NodeAdmission(limit)
        await self.backend.join()  # last: the frontend may send work as soon as it sees the node
        memory = self.info.memory
        log.info("node ready: %s, model %s, max_model_len %d, weights %.1f MiB, KV pools %.1f MiB",
                 self.backend.role, self.model_name, self.max_model_len,
                 memory.get("weights_bytes", 0) / (1 << 20), memory.get("kv_cache_bytes", 0) / (1 << 20))

    async def drain(self, timeout: float = 0.0) -> None:
        """Refuse new requests; with `timeout` > 0 leave the registry and let what is in flight finish
        for at most `timeout` seconds; then stop the backend: every request still open gets its
        finished delta ("abort"). A call while a drain waits cuts the wait short and returns once the
        backend is stopped."""
        if self.draining:
            self._cut.set()
            await self._drained.wait()
            return
        self.draining = True
        self.metrics.draining.set(1)
        started = self.generations
        try:
            if timeout > 0:
                deadline = time.monotonic() + timeout
                log.info("draining: %d requests in flight may finish within %g s (--drain-timeout); "
                         "new requests get 503", started, timeout)
                await self._leave(deadline)
                await self._wait_idle(deadline)
            else:
                log.info("draining: %d requests in flight end with finish_reason 'abort'", started)
            left = self.generations
            await self.backend.shutdown()
        finally:
            self._drained.set()
        if timeout > 0:
            log.info("drained: %d requests finished, %d aborted", max(started - left, 0), left)

    async def _leave(self, deadline: float) -> None:
        """Leave the bootstrap registry, but not past the drain's deadline or a second drain call: a
        bootstrap that does not answer must not lengthen the drain (the entry expires by itself)."""
        leave = asyncio.ensure_future(self.backend.leave())
        leave.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved: logged below
        cut = asyncio.ensure_future(self._cut.wait())
        try:
            await asyncio.wait(
                {leave, cut}, timeout=max(deadline - time.monotonic(), 0), return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            cut.cancel()
        if not leave.done():
            leave.cancel()
            log.warning("draining: the bootstrap registry did not answer in time; this node's entry expires by itself")
        elif not leave.cancelled() and leave.exception() is not None:
            log.warning("draining: could not leave the bootstrap registry", exc_info=leave.exception())

    async def _wait_idle(self, deadline: float) -> None:
        while self.generations and not self._cut.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            with contextlib.suppress(asyncio.TimeoutError):  # not the builtin on Python 3.10
                await asyncio.wait_for(self._cut.wait(), min(DRAIN_POLL_S, remaining))

    async def stop(self) -> None:
        await self.drain()
        deadline = time.monotonic() + DRAIN_S
        while self.open_streams and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self.tokenization is not None:
            self.tokenization.close()
