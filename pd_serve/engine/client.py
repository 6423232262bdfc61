"""The API process's handle on its engine process (asyncio).

`EngineClient.start()` spawns the engine process and waits for it to report ready (or fail);
`generate()` yields a request's `RequestDelta`s until the finished one and aborts the request in
the engine if the consumer stops early; `alive` is false once the process died (seen within 0.2 s) or
its heartbeat is older than `dead_after_s` (a loop stuck in one step; long enough that a slow step on
a loaded machine is not mistaken for a dead loop). When the engine dies, every open request gets a finished delta with an
error, so no caller waits forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import zmq
import zmq.asyncio

from pd_serve.aio import within
from pd_serve.config import DisaggConfig, EngineConfig
from pd_serve.engine import messages as m
from pd_serve.engine.process import EngineAddresses, run_engine
from pd_serve.engine.sampling_params import SamplingParams
from pd_serve.logs import current as current_logging

STATS_TIMEOUT_S = 10.0  # a first step (lazy torch init) on a loaded 2-core machine took > 2 s

log = logging.getLogger(__name__)


class EngineStartError(RuntimeError):
    pass


class EngineClient:
    def __init__(self, config: EngineConfig, dead_after_s: float = 30.0, disagg: DisaggConfig | None = None) -> None:
        self.config = config
        self.disagg = disagg
        self.addrs = EngineAddresses.fresh()
        self.dead_after_s = dead_after_s
        self.info: m.EngineReady | None = None
        self.last_stats: m.EngineStats | None = None
        self._last_beat = 0.0
        self._queues: dict[str, asyncio.Queue[m.RequestDelta]] = {}
        self._replies: dict[str, asyncio.Future[m.Reply]] = {}  # by call id
        self._ready: asyncio.Future[m.EngineReady | m.Reply] | None = None
        self._stats_waiters: list[asyncio.Future[m.EngineStats]] = []
        self._call_ids = itertools.count()
        self._ctx = zmq.asyncio.Context()
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._dead_reason: str | None = None

    # ---- lifecycle ---------------------------------------------------------------------------
    async def start(self, timeout: float = 600.0) -> m.EngineReady:
        self._out = self._ctx.socket(zmq.PULL)
        self._out.bind(self.addrs.outputs)
        self._in = self._ctx.socket(zmq.PUSH)
        self._in.setsockopt(zmq.LINGER, 0)
        self._in.connect(self.addrs.inputs)
        self._proc = multiprocessing.get_context("spawn").Process(
            target=run_engine,
            # the engine logs as we do, and stops should this process die without stopping it
            args=(self.config, self.addrs, self.disagg, current_logging(), os.getpid()),
            name="pd-serve-engine",
            daemon=True,
        )
        self._proc.start()
        log.info("engine process %d started: loading %s", self._proc.pid, self.config.model)
        ready: asyncio.Future[m.EngineReady | m.Reply] = asyncio.get_running_loop().create_future()
        self._ready = ready
        self._tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._watch())]
        try:
            reply = await asyncio.wait_for(ready, timeout)
        except asyncio.TimeoutError as exc:
            await self.shutdown()
            raise EngineStartError(f"engine did not become ready within {timeout:.0f} s") from exc
        if isinstance(reply, m.Reply):
            await self.shutdown()
            raise EngineStartError(f"engine failed to start: {reply.payload.get('error')}")
        self.info = reply
        self._last_beat = time.monotonic()
        return self.info

    async def shutdown(self, timeout: float = 10.0) -> None:
        proc = self._proc
        if proc is not None and proc.is_alive():
            with contextlib.suppress(zmq.ZMQError):
                await self._in.send(m.encode(m.Shutdown()))
            await asyncio.get_running_loop().run_in_executor(None, proc.join, timeout)
            if proc.is_alive():
                proc.kill()
                proc.join(2)
        for t in self._tasks:
            t.cancel()
        self._fail_all("engine shut down")
        self._ctx.destroy(linger=0)

    @property
    def alive(self) -> bool:
        return (
            self._dead_reason is None
            and self._proc is not None
            and self._proc.is_alive()
            and time.monotonic() - self._last_beat < self.dead_after_s
        )

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    # ---- requests ----------------------------------------------------------------------------
    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        timeout: float = 3600.0,
        pd: m.PDSpec | None = None,
    ) -> AsyncIterator[m.RequestDelta]:
        """Deltas of one request; the last one has finished=True. Leaving early aborts it."""
        if self._dead_reason is not None:
            yield m.RequestDelta(request_id, [], "", True, "abort", error=self._dead_reason)
            return
        queue: asyncio.Queue[m.RequestDelta] = asyncio.Queue()
        self._queues[request_id] = queue
        finished = False
        try:
            await self._in.send(m.encode(m.AddRequest(request_id, prompt_token_ids, params, pd)))
            while True:
                delta = await within(timeout, queue.get())
                finished = delta.finished
                yield delta
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                await self.abort(request_id)

    async def abort(self, request_id: str) -> None:
        with contextlib.suppress(zmq.ZMQError):
            await self._in.send(m.encode(m.AbortRequest(request_id)))

    async def stats(self, timeout: float = STATS_TIMEOUT_S) -> m.EngineStats:
        """Fresh statistics from the engine loop (raises TimeoutError if it does not answer): the
        loop answers between steps, and one step of a loaded 2-core machine can take seconds."""
        fut: asyncio.Future[m.EngineStats] = asyncio.get_running_loop().create_future()
        self._stats_waiters.append(fut)
        try:
            await self._in.send(m.encode(m.GetStats()))
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"engine did not answer within {timeout} s") from None
        finally:
            if fut in self._stats_waiters:
                self._stats_waiters.remove(fut)

    async def flush_cache(self, timeout: float = 10.0) -> int:
        call_id = self._new_call_id("flush")
        reply = await self._call(m.FlushCache(call_id), call_id, timeout)
        return int(reply.payload["freed_pages"])

    async def start_profile(self, directory: str, timeout: float = 30.0) -> None:
        """Start the torch profiler in the engine loop (RuntimeError if one is running)."""
        await self._profile_call(m.StartProfile(directory), timeout)

    async def stop_profile(self, timeout: float = 300.0) -> str:
        """Stop it; returns the path of the trace the engine wrote."""
        return str((await self._profile_call(m.StopProfile(), timeout))["trace"])

    async def _profile_call(self, msg: m.StartProfile | m.StopProfile, timeout: float) -> dict[str, Any]:
        msg.call_id = self._new_call_id("profile")
        payload = (await self._call(msg, msg.call_id, timeout)).payload
        if "error" in payload:
            raise RuntimeError(payload["error"])
        return dict(payload)

    def _new_call_id(self, kind: str) -> str:
        return f"{kind}-{next(self._call_ids)}"

    async def _call(
        self, msg: m.FlushCache | m.StartProfile | m.StopProfile, call_id: str, timeout: float
    ) -> m.Reply:
        """Send a control message and wait for the Reply that carries its call id."""
        fut: asyncio.Future[m.Reply] = asyncio.get_running_loop().create_future()
        self._replies[call_id] = fut
        try:
            await self._in.send(m.encode(msg))
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._replies.pop(call_id, None)

    # ---- background tasks ---------------------------------------------------------------------
    async def _read(self) -> None:
        while True:
            self._on_message(m.decode(await self._out.recv()))

    def _on_message(self, msg: object) -> None:
        if isinstance(msg, m.StepOutputs):
            for delta in msg.deltas:
                q = self._queues.get(delta.request_id)
                if q is not None:
                    q.put_nowait(delta)
        elif isinstance(msg, m.EngineStats):
            self.last_stats, self._last_beat = msg, time.monotonic()
            waiters, self._stats_waiters = self._stats_waiters, []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(msg)
        elif isinstance(msg, m.EngineReady) or (isinstance(msg, m.Reply) and not msg.call_id):
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(msg)  # ready, or failed to start
        elif isinstance(msg, m.Reply):
            reply = self._replies.pop(msg.call_id, None)
            if reply is not None and not reply.done():
                reply.set_result(msg)

    async def _watch(self) -> None:
        while self._proc is not None and self._proc.is_alive():
            await asyncio.sleep(0.2)
        code = self._proc.exitcode if self._proc else None
        self._fail_all(f"engine process exited (code {code})")
        fut = self._ready
        if fut is not None and not fut.done():
            fut.set_result(m.Reply("failed", {"error": f"engine process exited (code {code}) before it was ready"}))

    def _fail_all(self, reason: str) -> None:
        self._dead_reason = self._dead_reason or reason
        for rid, q in list(self._queues.items()):
            q.put_nowait(m.RequestDelta(rid, [], "", True, "abort", error=reason))
