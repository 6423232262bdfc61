"""One OpenAI request -> engine requests through the `NodeBackend` -> one response or SSE stream.

Order: refuse what this node cannot serve (model name, `pd`, unsupported fields), tokenize, plan one
engine request per (prompt, choice) with its max_tokens and seed, take admission slots, start the
engine requests and wait for each one's first delta (so a request the engine refuses is still a
clean 400 even when streaming), then collect or stream. A client that leaves early has its engine
requests closed, which aborts them and frees their pages: a stream notices on its next chunk, a
non-streamed answer (and a prefill node's rooms, when the frontend hangs up) by watching the
connection for the hang-up.

The steps live beside it: `planning` (engine requests and their 400s), `streams` (the engine
streams: metrics, merge, close) and `hangup` (a non-streamed answer's client leaving).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse

from pd_serve.aio import TaskSet
from pd_serve.engine.messages import RequestDelta
from pd_serve.openai_errors import ErrorCode
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
from pd_serve.server.hangup import HangUpWatch, unless_gone
from pd_serve.server.planning import PlannedChoice, choice_pd, plan
from pd_serve.server.schemas import ChatCompletionRequest, CompletionRequest, _GenerationRequest
from pd_serve.server.state import NodeState, Ticket
from pd_serve.server.streams import Stream, close_all, close_and_release, engine_stream, merge

# closing the streams of a stream whose client left: in a task of its own (see `_stream`)
_CLOSERS = TaskSet()


class OpenAIServing:
    def __init__(self, state: NodeState) -> None:
        self.state = state

    async def chat(
        self, req: ChatCompletionRequest, hung_up: HangUpWatch | None = None
    ) -> JSONResponse | StreamingResponse:
        self._refuse_early(req)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        ids = await self.state.tokenizer.render_chat(messages, req.add_generation_prompt)
        fmt = ResponseFormat(chat=True, response_id=f"chatcmpl-{uuid.uuid4().hex}", model=self.state.model_name)
        return await self._serve(req, fmt, [ids], "messages", hung_up)

    async def completions(
        self, req: CompletionRequest, hung_up: HangUpWatch | None = None
    ) -> JSONResponse | StreamingResponse:
        self._refuse_early(req)
        tok = self.state.tokenizer
        prompts = [p if isinstance(p, list) else await tok.encode(p) for p in req.prompts()]
        fmt = ResponseFormat(chat=False, response_id=f"cmpl-{uuid.uuid4().hex}", model=self.state.model_name)
        return await self._serve(req, fmt, prompts, "prompt", hung_up)

    def _refuse_early(self, req: _GenerationRequest) -> None:
        if self.state.draining:
            raise APIError(503, "the node is draining (shutting down): it takes no new requests; retry on another node",
                           code=ErrorCode.DRAINING, headers={"Retry-After": "1"})
        if not self.state.backend.alive:
            raise APIError(503, "the engine is not alive", code=ErrorCode.ENGINE_UNAVAILABLE, headers={"Retry-After": "1"})
        if req.model != self.state.model_name:
            raise APIError(
                400,
                f"model {req.model!r} is not served here; this node serves {self.state.model_name!r} (GET /v1/models)",
                param="model",
                code=ErrorCode.MODEL_NOT_FOUND,
            )
        self.state.backend.check_pd(req.pd)
        req.check_supported()
        self.state.admission.check(req.num_prompts() * req.n)  # before tokenizing thousands of prompts for nothing

    # ---- running -------------------------------------------------------------------------------
    async def _serve(
        self,
        req: _GenerationRequest,
        fmt: ResponseFormat,
        prompts: list[list[int]],
        prompt_param: str,
        hung_up: HangUpWatch | None = None,
    ) -> JSONResponse | StreamingResponse:
        """`hung_up`: for the non-streamed answers, which would otherwise run to the end for a
        client that left (a stream notices on its next chunk)."""
        planned = plan(req, prompts, prompt_param, fmt.response_id, self.state.limits)
        arrival = time.monotonic()
        if self.state.backend.role == "prefill":
            return await self._prefill(req, planned, arrival, hung_up)
        if req.stream:
            # slots are taken when the body starts: a stream Starlette never starts holds none
            self.state.admission.check(len(planned))
            body = self._stream(req, fmt, planned, arrival)
            return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        ticket = self.state.admission.acquire(len(planned))
        streams = self._streams(req, planned, ticket, arrival)
        try:
            return JSONResponse(await unless_gone(self._collect(req, fmt, planned, streams), hung_up))
        finally:
            await close_all(streams)
            ticket.release_all()

    async def _prefill(
        self, req: _GenerationRequest, planned: list[PlannedChoice], arrival: float, hung_up: HangUpWatch | None
    ) -> JSONResponse:
        """A prefill node's answer: once every room of the request is done, its timings (never streamed).
        The frontend hangs up when its client does: the rooms are then aborted here too."""
        ticket = self.state.admission.acquire(len(planned))
        streams = self._streams(req, planned, ticket, arrival)
        rooms: list[dict[str, object]] = []

        async def finals_of_all() -> dict[int, RequestDelta]:
            finals: dict[int, RequestDelta] = {}
            async for i, delta in merge(streams):
                if delta.finished:
                    finals[i] = delta
            return finals

        try:
            finals = await unless_gone(finals_of_all(), hung_up)
            for i, c in enumerate(planned):
                final = finals[i]
                if final.error is not None or final.finish_reason == "abort":
                    reason = final.error or "aborted"
                    param = final.error_param
                    if param is not None and param != "pd":
                        raise bad_request(req.request_param(param), reason)
                    raise APIError(502, f"prefill of room {choice_pd(req.pd, c.index).room} failed: {reason}",  # type: ignore[union-attr]
                                   code=ErrorCode.PREFILL_FAILED)
                for phase, seconds in (final.info or {}).items():
                    self.state.metrics.prefill_phase.labels(phase=phase.removesuffix("_s")).observe(seconds)
                rooms.append({"room": choice_pd(req.pd, c.index).room, "prompt_tokens": final.num_prompt_tokens,  # type: ignore[union-attr]
                              "cached_tokens": final.num_cached_tokens, "timings": final.info or {}})
        finally:
            await close_all(streams)
            ticket.release_all()
        first = rooms[0]
        return JSONResponse({**first, "rooms": rooms})

    def _streams(self, req: _GenerationRequest, planned: list[PlannedChoice], ticket: Ticket, arrival: float) -> list[Stream]:
        return [engine_stream(self.state, c, choice_pd(req.pd, c.index), ticket, arrival) for c in planned]

    def _refusal(self, req: _GenerationRequest, choice: ChoiceState, delta: RequestDelta) -> APIError | None:
        """The error for a request the engine refused or lost before it produced anything."""
        if delta.error is None or choice.num_output_tokens or delta.new_token_ids:
            return None
        if delta.error_param is not None:
            return bad_request(req.request_param(delta.error_param), delta.error)
        return APIError(503, f"the engine could not serve the request: {delta.error}",
                        code=delta.error_code or ErrorCode.ENGINE_UNAVAILABLE, headers={"Retry-After": "1"})

    async def _collect(
        self, req: _GenerationRequest, fmt: ResponseFormat, planned: list[PlannedChoice], streams: list[Stream]
    ) -> dict[str, object]:
        choices = [ChoiceState(c.index) for c in planned]
        async for i, delta in merge(streams):
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
        streams = self._streams(req, planned, ticket, arrival)
        choices = [ChoiceState(c.index) for c in planned]
        offsets = [0] * len(choices)
        self.state.open_streams += 1
        try:
            async for i, delta in merge(streams):
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
            _CLOSERS.spawn(close_and_release(streams, ticket))

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


def _usage(choices: list[ChoiceState], n: int) -> Usage:
    """Prompt tokens count once per prompt (not per choice), as OpenAI counts them."""
    prompt = sum(c.num_prompt_tokens for c in choices[::n])
    return Usage(prompt_tokens=prompt, completion_tokens=sum(c.num_output_tokens for c in choices))
