"""SGLang's `SglangScheduler` gRPC service on this node, for smg's `grpc://` workers.

Generate runs through the node's own backend, as the HTTP routes do: `grpc_convert.plan_generate`
(refusals named by proto field), admission slots, one `streams.engine_stream` per choice (room + i for
choice i), `streams.merge`; streamed requests get a chunk per delta with new tokens, every request a
`GenerateComplete` per choice. Abort (smg sends it when it drops a stream) and a client's
cancellation close the engine streams, which aborts the engine requests and frees their pages.

Every RPC first checks the caller (`CallerCheck`); every structured answer is a protobuf Struct or a
JSON string, never a repr. It never touches the engine but through `NodeState.backend`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import grpc
import orjson
from smg_grpc_proto.generated import common_pb2, sglang_scheduler_pb2_grpc
from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb

from pd_serve.aio import TaskSet
from pd_serve.engine.messages import RequestDelta
from pd_serve.openai_errors import ErrorCode
from pd_serve.server.errors import APIError
from pd_serve.server.grpc_convert import (
    ChoiceProgress,
    GeneratePlan,
    GrpcRefusal,
    chunk,
    complete,
    plan_generate,
    refusal_of,
)
from pd_serve.server.grpc_info import model_info, scheduler_loads, server_info, tokenizer_chunks
from pd_serve.server.planning import choice_pd
from pd_serve.server.state import NodeState
from pd_serve.server.streams import close_and_release, engine_stream, merge

log = logging.getLogger(__name__)
T = TypeVar("T")
_CLOSERS = TaskSet()  # closing a cancelled call's engine streams, in tasks of their own
_RETRYABLE = (None, ErrorCode.ENGINE_UNAVAILABLE, ErrorCode.PREFILL_UNREACHABLE)


class CallerCheck:
    """The secret a call must carry in its metadata (`authorization: Bearer S`, or the cluster token in
    `x-pd-cluster-token`): the cluster token, else the node's API key, else none (an open node)."""

    def __init__(self, cluster_token: str | None, api_key: str | None) -> None:
        self._secret = (cluster_token or api_key or "").encode() or None

    async def check(self, context: Any) -> None:
        if self._secret is None:
            return
        import hmac

        metadata = dict(context.invocation_metadata() or ())
        bearer = str(metadata.get("authorization", ""))
        given = bearer[7:].strip() if bearer[:7].lower() == "bearer " else metadata.get("x-pd-cluster-token")
        if not given:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "this node needs the cluster token (or its --api-key) in the call metadata: authorization: Bearer TOKEN",
            )
        if not hmac.compare_digest(str(given).encode(), self._secret):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "the authorization metadata does not hold this node's token")


class SchedulerService(sglang_scheduler_pb2_grpc.SglangSchedulerServicer):  # type: ignore[misc]
    def __init__(self, state: NodeState) -> None:
        self.state = state
        self.caller = CallerCheck(state.config.cluster_token, state.config.api_key)
        self._aborts: dict[str, asyncio.Event] = {}  # request_id -> set by Abort

    # ---- Generate ------------------------------------------------------------------------------
    async def Generate(self, request: Any, context: Any) -> AsyncIterator[Any]:
        await self.caller.check(context)
        try:
            self._refuse_now()
            plan = plan_generate(request, self.state)
            self.state.admission.check(len(plan.choices))
        except GrpcRefusal as refused:
            await context.abort(refused.code, refused.message)
            return
        except APIError as exc:
            status = refusal_of(exc)
            await context.abort(status.code, status.message)
            return
        async for message in self._run(request.request_id, plan, context):
            yield message

    def _refuse_now(self) -> None:
        if self.state.draining:
            raise GrpcRefusal(grpc.StatusCode.UNAVAILABLE, "the node is draining (shutting down); retry on another node")
        if not self.state.backend.alive:
            raise GrpcRefusal(grpc.StatusCode.UNAVAILABLE, "the engine is not alive")
        if self.state.info is None or self.state.tokenization is None:
            raise GrpcRefusal(grpc.StatusCode.UNAVAILABLE, "the node is still starting")

    async def _run(self, rid: str, plan: GeneratePlan, context: Any) -> AsyncIterator[Any]:
        state = self.state
        ticket = state.admission.acquire(len(plan.choices), force=True)
        arrival = time.monotonic()
        streams = [engine_stream(state, c, choice_pd(plan.pd, c.index), ticket, arrival) for c in plan.choices]
        progress = [ChoiceProgress(c.index) for c in plan.choices]
        aborted = self._aborts[rid] = asyncio.Event()
        state.generations += 1
        try:
            refusal = None
            async for i, delta in _until(merge(streams), aborted):
                refusal = _engine_refusal(progress[i], delta)
                if refusal is not None:
                    break
                progress[i].apply(delta)
                if plan.stream and delta.new_token_ids:
                    yield chunk(rid, progress[i], delta.new_token_ids)
                if delta.finished:
                    yield complete(rid, progress[i])
            if refusal is not None:
                await context.abort(refusal.code, refusal.message)
            for c in progress:  # aborted: the choices still open end as SGLang's do
                if c.finish_reason is None:
                    yield complete(rid, c)
        finally:
            state.generations -= 1
            if self._aborts.get(rid) is aborted:
                del self._aborts[rid]
            _CLOSERS.spawn(close_and_release(streams, ticket))

    async def Abort(self, request: Any, context: Any) -> Any:
        await self.caller.check(context)
        aborted = self._aborts.get(request.request_id)
        if aborted is None:
            return pb.AbortResponse(success=False, message=f"no request {request.request_id!r} in flight here")
        aborted.set()
        return pb.AbortResponse(success=True, message="aborted")

    # ---- node information ----------------------------------------------------------------------
    async def HealthCheck(self, request: Any, context: Any) -> Any:
        await self.caller.check(context)
        if self.state.draining:
            return pb.HealthCheckResponse(healthy=False, message="draining")
        if not self.state.backend.alive:
            return pb.HealthCheckResponse(healthy=False, message="engine not alive")
        return pb.HealthCheckResponse(healthy=True, message="ok")

    async def GetModelInfo(self, request: Any, context: Any) -> Any:
        await self.caller.check(context)
        await self._require_started(context)
        return model_info(self.state)

    async def GetServerInfo(self, request: Any, context: Any) -> Any:
        await self.caller.check(context)
        await self._require_started(context)
        return server_info(self.state, await self._stats(context))

    async def GetLoads(self, request: Any, context: Any) -> Any:
        await self.caller.check(context)
        await self._require_started(context)
        if request.HasField("dp_rank") and request.dp_rank != 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"dp_rank: {request.dp_rank}; this node has rank 0 only")
        return scheduler_loads(self.state, await self._stats(context), set(request.include))

    async def GetTokenizer(self, request: Any, context: Any) -> AsyncIterator[Any]:
        await self.caller.check(context)
        await self._require_started(context)
        for data, digest in await asyncio.to_thread(tokenizer_chunks, self.state):
            yield common_pb2.GetTokenizerChunk(data=data, sha256=digest)

    # ---- admin ---------------------------------------------------------------------------------
    async def FlushCache(self, request: Any, context: Any) -> Any:
        await self.caller.check(context)
        await self._require_started(context)
        freed = await self._backend_call(context, self.state.backend.flush_cache())
        return common_pb2.FlushCacheResponse(success=True, message=orjson.dumps({"freed_pages": freed}).decode())

    async def StartProfile(self, request: Any, context: Any) -> Any:
        from pd_serve.server.admin import DEFAULT_PROFILE_DIR

        await self.caller.check(context)
        await self._require_started(context)
        directory = request.output_dir or self.state.config.profile_dir or DEFAULT_PROFILE_DIR
        await self._backend_call(context, self.state.backend.start_profile(directory))
        return common_pb2.ProfileResponse(success=True, message=orjson.dumps({"output_dir": directory}).decode())

    async def StopProfile(self, request: Any, context: Any) -> Any:
        await self.caller.check(context)
        await self._require_started(context)
        trace = await self._backend_call(context, self.state.backend.stop_profile())
        return common_pb2.ProfileResponse(success=True, message=orjson.dumps({"trace": trace}).decode())

    # ---- unsupported ---------------------------------------------------------------------------
    async def Embed(self, request: Any, context: Any) -> Any:
        await self._unsupported(context, "Embed: this node serves a generation model; embeddings are not supported")

    async def SubscribeKvEvents(self, request: Any, context: Any) -> Any:
        await self._unsupported(context, "SubscribeKvEvents: this node publishes no KV cache events; poll GetLoads")

    async def LoadLoRAAdapter(self, request: Any, context: Any) -> Any:
        await self._unsupported(context, "LoadLoRAAdapter: LoRA adapters are not supported")

    async def UnloadLoRAAdapter(self, request: Any, context: Any) -> Any:
        await self._unsupported(context, "UnloadLoRAAdapter: LoRA adapters are not supported")

    async def ListLoadedLoRAAdapters(self, request: Any, context: Any) -> Any:
        await self.caller.check(context)
        return pb.ListLoadedLoRAAdaptersResponse()  # none: a true answer, which lets smg reconcile

    async def _unsupported(self, context: Any, message: str) -> None:
        await self.caller.check(context)
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)

    # ---- helpers -------------------------------------------------------------------------------
    async def _require_started(self, context: Any) -> None:
        try:
            self._refuse_now()
        except GrpcRefusal as refusal:
            if not self.state.draining:
                await context.abort(refusal.code, refusal.message)

    async def _stats(self, context: Any) -> Any:
        return await self._backend_call(context, self.state.backend.stats())

    async def _backend_call(self, context: Any, call: Any) -> Any:
        try:
            return await call
        except TimeoutError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the engine did not answer: {exc}")
        except RuntimeError as exc:  # the profiler's state (already running, not running)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))


def _engine_refusal(c: ChoiceProgress, delta: RequestDelta) -> GrpcRefusal | None:
    """The status for a request the engine refused or lost before it produced anything."""
    if delta.error is None or c.output_ids or delta.new_token_ids:
        return None
    if delta.error_param is not None:
        return refusal_of(APIError(400, delta.error, param=delta.error_param), "sampling_params.")
    code = grpc.StatusCode.UNAVAILABLE if delta.error_code in _RETRYABLE else grpc.StatusCode.INTERNAL
    return GrpcRefusal(code, f"the engine could not serve the request: {delta.error}")


async def _until(items: AsyncIterator[T], stop: asyncio.Event) -> AsyncIterator[T]:
    """`items` until they end or `stop` is set (the pending read is then cancelled)."""
    stopped = asyncio.ensure_future(stop.wait())
    try:
        while True:
            nxt = asyncio.ensure_future(_next(items))
            done, _ = await asyncio.wait({nxt, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if nxt not in done:
                nxt.cancel()
                await asyncio.gather(nxt, return_exceptions=True)
                return
            more, item = nxt.result()
            if not more:
                return
            yield item  # type: ignore[misc]
    finally:
        stopped.cancel()


async def _next(items: AsyncIterator[T]) -> tuple[bool, T | None]:
    try:
        return True, await items.__anext__()
    except StopAsyncIteration:
        return False, None
