"""One OpenAI request -> engine requests through the `NodeBackend` -> one response or SSE stream.

Order: refuse what this node cannot serve (model name, `pd`, unsupported fields), tokenize, plan one
engine request per (prompt, choice) with its max_tokens and seed, take admission slots, start the
engine requests and wait for each one's first delta (so a request the engine refuses is still a
clean 400 even when streaming), then collect or stream. A client that leaves early has its engine
requests closed, which aborts them and frees their pages: a stream notices on its next chunk, a
non-streamed answer (and a prefill node's rooms, when the frontend hangs up) by watching the
connection for the hang-up.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi.responses import StreamingResponse

from pd_serve.engine.messages import RequestDelta
from pd_serve.engine.sampling_params import SamplingParams
from pd_serve.server.errors import APIError, bad_request
from pd_serve.server.formatting import (
    SSE_DONE,
    ChoiceState,
    JSONResponse,
    ResponseFormat,
    Usage,
    logprob_token_ids,
    sse,
)
from pd_serve.server.schemas import ChatCompletionRequest, CompletionRequest, PDSpec, _GenerationRequest
from pd_serve.server.state import NodeState, Ticket

Stream = AsyncIterator[RequestDelta]
ClientGone = Callable[[], Awaitable[None]]  # returns once the client has hung up


class ClientDisconnected(APIError):
    """The client hung up before a non-streamed answer was ready: its engine requests were aborted."""

    def __init__(self) -> None:
        super().__init__(499, "the client closed the request before the answer was ready", code="client_closed")


async def _unless_gone(work: Coroutine[Any, Any, Any], client_gone: ClientGone | None) -> Any:
    """`work`'s result; if the client hangs up first, `work` is cancelled and ClientDisconnected raised
    (the caller's `finally` then closes the engine streams, which aborts them and frees their pages)."""
    if client_gone is None:
        return await work
    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(client_gone())
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this request itself is being cancelled
        gone.cancel()
        _stop(task)
        raise
    if task.done():
        gone.cancel()
        return task.result()
    # The client left. Cancel until the work has stopped: before Python 3.12, asyncio.wait_for (the
    # engine client's wait for the next delta) drops a cancel that lands as its inner wait completes,
    # and the request would then run to its end for nobody.
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.05)
    if not task.cancelled():
        task.exception()  # retrieved: the client is gone, nobody reads it
    raise ClientDisconnected()


def _stop(task: asyncio.Future[Any]) -> None:
    """Cancel `task` from a caller that is itself being cancelled: retried in the background."""

    async def until_stopped() -> None:
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.05)

    _STOPPING.add(stopper := asyncio.ensure_future(until_stopped()))
    stopper.add_done_callback(_STOPPING.discard)


_STOPPING: set[asyncio.Future[None]] = set()  # the loop keeps only weak references to tasks


@dataclass(frozen=True)
class PlannedChoice:
    index: int
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


class OpenAIServing:
    def __init__(self, state: NodeState) -> None:
        self.state = state

    async def chat(
        self, req: ChatCompletionRequest, client_gone: ClientGone | None = None
    ) -> JSONResponse | StreamingResponse:
        self._refuse_early(req)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        ids = await self.state.tokenizer.render_chat(messages, req.add_generation_prompt)
        fmt = ResponseFormat(chat=True, response_id=f"chatcmpl-{uuid.uuid4().hex}", model=self.state.model_name)
        return await self._serve(req, fmt, [ids], "messages", client_gone)

    async def completions(
        self, req: CompletionRequest, client_gone: ClientGone | None = None
    ) -> JSONResponse | StreamingResponse:
        self._refuse_early(req)
        tok = self.state.tokenizer
        prompts = [p if isinstance(p, list) else await tok.encode(p) for p in req.prompts()]
        fmt = ResponseFormat(chat=False, response_id=f"cmpl-{uuid.uuid4().hex}", model=self.state.model_name)
        return await self._serve(req, fmt, prompts, "prompt", client_gone)

    def _refuse_early(self, req: _GenerationRequest) -> None:
        if self.state.draining:
            raise APIError(503, "the node is draining (shutting down): it takes no new requests; retry on another node",
                           code="draining", headers={"Retry-After": "1"})
        if not self.state.backend.alive:
            raise APIError(503, "the engine is not alive", code="engine_unavailable", headers={"Retry-After": "1"})
        if req.model != self.state.model_name:
            raise APIError(
                400,
                f"model {req.model!r} is not served here; this node serves {self.state.model_name!r} (GET /v1/models)",
                param="model",
                code="model_not_found",
            )
        self.state.backend.check_pd(req.pd)
        req.check_supported()
        self.state.admission.check(req.num_prompts() * req.n)  # before tokenizing thousands of prompts for nothing

    # ---- planning ------------------------------------------------------------------------------
    def plan(self, req: _GenerationRequest, prompts: Sequence[list[int]], prompt_param: str, rid: str) -> list[PlannedChoice]:
        """One engine request per (prompt, choice); refuses here what the engine would refuse."""
        requested, name = req.requested_max_tokens()
        planned = []
        for p_idx, ids in enumerate(prompts):
            room = self._check_prompt(ids, prompt_param)
            max_tokens = room if requested is None else requested
            for j in range(req.n):
                seed = None if req.seed is None else req.seed + j
                params = req.sampling_params(max_tokens, seed)
                self._check_budget(len(ids), max_tokens, name)
                index = p_idx * req.n + j
                planned.append(PlannedChoice(index, f"{rid}-{index}", ids, params))
        return planned

    def _check_prompt(self, ids: list[int], param: str) -> int:
        """Validate a prompt's tokens; returns the room left for output in the context."""
        limits = self.state.limits
        if not ids:
            raise bad_request(param, "the prompt is empty")
        bad = next((t for t in ids if not 0 <= t < limits.vocab_size), None)
        if bad is not None:
            raise bad_request(param, f"token id {bad} is outside the vocabulary (0..{limits.vocab_size - 1})")
        room = limits.max_model_len - len(ids)
        if room < 1:
            raise bad_request(
                param,
                f"the prompt has {len(ids)} tokens; the context length is {limits.max_model_len} "
                "(--max-model-len), which leaves no room for output",
                code="context_length_exceeded",
            )
        return room

    def _check_budget(self, prompt_len: int, max_tokens: int, name: str) -> None:
        limits = self.state.limits
        total = prompt_len + max_tokens
        if total > limits.max_model_len:
            raise bad_request(
                name,
                f"prompt ({prompt_len} tokens) + {name} ({max_tokens}) = {total} exceeds the context "
                f"length {limits.max_model_len} (--max-model-len)",
                code="context_length_exceeded",
            )
        if total > limits.kv_capacity_tokens:
            raise bad_request(
                name,
                f"prompt ({prompt_len} tokens) + {name} ({max_tokens}) = {total} exceeds the KV cache "
                f"of {limits.kv_capacity_tokens} tokens (--max-total-tokens or --kv-cache-memory)",
                code="context_length_exceeded",
            )

    # ---- running -------------------------------------------------------------------------------
    async def _serve(
        self,
        req: _GenerationRequest,
        fmt: ResponseFormat,
        prompts: list[list[int]],
        prompt_param: str,
        client_gone: ClientGone | None = None,
    ) -> JSONResponse | StreamingResponse:
        """`client_gone`: for the non-streamed answers, which would otherwise run to the end for a
        client that left (a stream notices on its next chunk)."""
        planned = self.plan(req, prompts, prompt_param, fmt.response_id)
        arrival = time.monotonic()
        if self.state.backend.role == "prefill":
            return await self._prefill(req, planned, arrival, client_gone)
        if req.stream:
            # slots are taken when the body starts: a stream Starlette never starts holds none
            self.state.admission.check(len(planned))
            body = self._stream(req, fmt, planned, arrival)
            return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        ticket = self.state.admission.acquire(len(planned))
        streams = [self._engine_stream(c, req, ticket, arrival) for c in planned]
        try:
            return JSONResponse(await _unless_gone(self._collect(req, fmt, planned, streams), client_gone))
        finally:
            await _close_all(streams)
            ticket.release_all()

    def _engine_stream(self, c: PlannedChoice, req: _GenerationRequest, ticket: Ticket, arrival: float) -> Stream:
        """The backend's deltas for one choice, with latency metrics; holds one admission slot."""

        async def run() -> Stream:
            m = self.state.metrics
            last = None
            try:
                pd = _choice_pd(req.pd, c.index)
                async for delta in self.state.backend.generate(c.prompt_ids, c.params, c.request_id, pd):
                    now = time.monotonic()
                    if pd is not None and last is None and delta.new_token_ids:
                        m.handoff.observe(now - arrival)
                    if delta.error and pd is not None:
                        m.room_failed(delta.error)
                    if delta.new_token_ids:
                        if last is None:
                            m.ttft.observe(now - arrival)
                        else:
                            m.itl.observe((now - last) / len(delta.new_token_ids))
                        last = now
                        m.generation_tokens.inc(len(delta.new_token_ids))
                    if delta.finished:
                        m.e2e.observe(now - arrival)
                        m.prompt_tokens.inc(delta.num_prompt_tokens)
                        m.finished.labels(reason=delta.finish_reason or "stop").inc()
                    yield delta
            finally:
                ticket.release_one()

        return run()

    async def _prefill(
        self, req: _GenerationRequest, planned: list[PlannedChoice], arrival: float, client_gone: ClientGone | None
    ) -> JSONResponse:
        """A prefill node's answer: once every room of the request is done, its timings (never streamed).
        The frontend hangs up when its client does: the rooms are then aborted here too."""
        ticket = self.state.admission.acquire(len(planned))
        streams = [self._engine_stream(c, req, ticket, arrival) for c in planned]
        rooms: list[dict[str, object]] = []

        async def finals_of_all() -> dict[int, RequestDelta]:
            finals: dict[int, RequestDelta] = {}
            async for i, delta in _merge(streams, list(range(len(streams)))):
                if delta.finished:
                    finals[i] = delta
            return finals

        try:
            finals = await _unless_gone(finals_of_all(), client_gone)
            for i, c in enumerate(planned):
                final = finals[i]
                if final.error is not None or final.finish_reason == "abort":
                    reason = final.error or "aborted"
                    param = final.error_param
                    if param is not None and param != "pd":
                        raise bad_request(req.request_param(param), reason)
                    raise APIError(502, f"prefill of room {_choice_pd(req.pd, c.index).room} failed: {reason}",  # type: ignore[union-attr]
                                   code="prefill_failed")
                for phase, seconds in (final.info or {}).items():
                    self.state.metrics.prefill_phase.labels(phase=phase.removesuffix("_s")).observe(seconds)
                rooms.append({"room": _choice_pd(req.pd, c.index).room, "prompt_tokens": final.num_prompt_tokens,  # type: ignore[union-attr]
                              "cached_tokens": final.num_cached_tokens, "timings": final.info or {}})
        finally:
            await _close_all(streams)
            ticket.release_all()
        first = rooms[0]
        return JSONResponse({**first, "rooms": rooms})

    def _refusal(self, req: _GenerationRequest, choice: ChoiceState, delta: RequestDelta) -> APIError | None:
        """The error for a request the engine refused or lost before it produced anything."""
        if delta.error is None or choice.num_output_tokens or delta.new_token_ids:
            return None
        if delta.error_param is not None:
            return bad_request(req.request_param(delta.error_param), delta.error)
        return APIError(503, f"the engine could not serve the request: {delta.error}",
                        code=delta.error_code or "engine_unavailable", headers={"Retry-After": "1"})

    async def _collect(
        self, req: _GenerationRequest, fmt: ResponseFormat, planned: list[PlannedChoice], streams: list[Stream]
    ) -> dict[str, object]:
        choices = [ChoiceState(c.index) for c in planned]
        async for i, delta in _merge(streams, list(range(len(streams)))):
            error = self._refusal(req, choices[i], delta)
            if error is not None:
                raise error
            choices[i].apply(delta)
        want = req.requested_logprobs() is not None
        ids = set().union(*(logprob_token_ids(c.logprobs) for c in choices)) if want else set()
        strings = await self._strings(ids)
        return fmt.response(choices, _usage(choices, req.n), strings, want)

    async def _stream(
        self, req: _GenerationRequest, fmt: ResponseFormat, planned: list[PlannedChoice], arrival: float
    ) -> AsyncIterator[bytes]:
        ticket = self.state.admission.acquire(len(planned), force=True)
        streams = [self._engine_stream(c, req, ticket, arrival) for c in planned]
        choices = [ChoiceState(c.index) for c in planned]
        offsets = [0] * len(choices)
        self.state.open_streams += 1
        try:
            async for i, delta in _merge(streams, list(range(len(streams)))):
                error = self._refusal(req, choices[i], delta)
                if error is not None:  # the status line is gone: the error travels as an event
                    yield sse(error.body())
                    break
                yield await self._chunk(req, fmt, choices[i], delta, offsets)
            else:
                if req.include_usage:
                    yield sse(fmt.usage_chunk(_usage(choices, req.n)))
            yield SSE_DONE
        finally:
            self.state.open_streams -= 1
            # a task of its own: after a disconnect this generator runs in a cancelled scope,
            # where any await would be cancelled again before the aborts reach the engine
            _background(_close_and_release(streams, ticket))

    async def _chunk(
        self, req: _GenerationRequest, fmt: ResponseFormat, choice: ChoiceState, delta: RequestDelta, offsets: list[int]
    ) -> bytes:
        choice.apply(delta)
        strings = await self._strings(logprob_token_ids(delta.logprobs)) if delta.logprobs else {}
        chunk = fmt.chunk(choice, delta, strings, req.include_usage, offsets[choice.index])
        offsets[choice.index] += len(delta.new_text)
        return sse(chunk)

    async def _strings(self, ids: set[int]) -> dict[int, str]:
        if not ids:
            return {}
        order = sorted(ids)
        return dict(zip(order, await self.state.tokenizer.token_strings(order)))


def _choice_pd(pd: PDSpec | None, index: int) -> PDSpec | None:
    """Choice i of a request (n > 1, or several prompts) uses room + i: both nodes derive the same rooms."""
    if pd is None or index == 0:
        return pd
    return pd.model_copy(update={"room": (pd.room + index) % (1 << 63)})


def _usage(choices: list[ChoiceState], n: int) -> Usage:
    """Prompt tokens count once per prompt (not per choice), as OpenAI counts them."""
    prompt = sum(c.num_prompt_tokens for c in choices[::n])
    return Usage(prompt_tokens=prompt, completion_tokens=sum(c.num_output_tokens for c in choices))


async def _merge(streams: list[Stream], indices: list[int]) -> AsyncIterator[tuple[int, RequestDelta]]:
    """Deltas of several streams as they come, tagged with their choice index."""
    if len(streams) == 1:
        async for delta in streams[0]:
            yield indices[0], delta
        return
    queue: asyncio.Queue[tuple[int, RequestDelta | None]] = asyncio.Queue()

    async def pump(i: int, stream: Stream) -> None:
        try:
            async for delta in stream:
                queue.put_nowait((i, delta))
        finally:
            queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in zip(indices, streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _close_all(streams: list[Stream]) -> None:
    """Close every engine stream (aborting unfinished requests in the engine)."""
    for s in streams:
        try:
            await s.aclose()  # type: ignore[attr-defined]
        except RuntimeError:  # still being closed by its cancelled pump task, which aborts it
            continue


async def _close_and_release(streams: list[Stream], ticket: Ticket) -> None:
    try:
        await _close_all(streams)
    finally:
        ticket.release_all()


_BACKGROUND: set[asyncio.Task[None]] = set()


def _background(coro: Coroutine[Any, Any, None]) -> None:
    task = asyncio.get_running_loop().create_task(coro)
    _BACKGROUND.add(task)  # the loop keeps only weak references to tasks
    task.add_done_callback(_BACKGROUND.discard)
