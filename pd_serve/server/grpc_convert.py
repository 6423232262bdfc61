"""SGLang's scheduler gRPC messages (`smg-grpc-proto`) <-> this node's engine requests and deltas.

- `plan_generate(request, state)`: a `GenerateRequest` -> one `PlannedChoice` per `n` and the `pd` of its
  `disaggregated_params` (mapped by `sglang_pd.with_sglang_pd`, as the HTTP fields are), or a
  `GrpcRefusal` naming the proto field at fault (INVALID_ARGUMENT) or the feature it lacks
  (UNIMPLEMENTED);
- `chunk(...)` / `complete(...)`: a choice's deltas as `GenerateStreamChunk` (new token ids, cumulative
  counts) and its final `GenerateComplete` (every output id, the finish reason as OpenAI's string).

Pure: no I/O, no engine; proto3 scalars cannot tell "unset" from 0, so a 0 where 0 means nothing
(top_p, repetition_penalty, top_k, n) takes SGLang's default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import grpc
from pydantic import ValidationError
from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb

from pd_serve.engine.messages import RequestDelta
from pd_serve.engine.sampling_params import InvalidParameter, SamplingParams
from pd_serve.server.errors import APIError
from pd_serve.server.planning import PlannedChoice, check_budget, check_prompt
from pd_serve.server.schemas import MAX_N, CompletionRequest, PDParams, param_from_location
from pd_serve.server.sglang_generate import SGLANG_DEFAULT_MAX_NEW_TOKENS
from pd_serve.server.sglang_pd import with_sglang_pd
from pd_serve.server.state import NodeState

ROOM_MASK = (1 << 63) - 1  # the proto's room is an int32: a negative one maps the same on both nodes
_PROMPT = "tokenized.input_ids"
# request fields that select what this server does not do, and the field that turns each on
_UNSUPPORTED = (
    ("return_logprob", "logprobs"),
    ("return_hidden_states", "hidden states"),
    ("input_embeds", "input embeddings"),
    ("lora_id", "LoRA adapters"),
    ("custom_logit_processor", "custom logit processors"),
)
_PARAMS = {"max_tokens": "max_new_tokens", "pd": "disaggregated_params"}  # our name -> the proto's


class GrpcRefusal(Exception):
    """A request refused before any work: the status code and a message naming the field."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def refusal_of(exc: APIError, prefix: str = "") -> GrpcRefusal:
    """An HTTP-shaped refusal as a gRPC status: 400 INVALID_ARGUMENT (naming the proto field), 503
    UNAVAILABLE (draining, full, engine down: a router retries elsewhere), anything else INTERNAL."""
    if exc.status == 400:
        param = _proto_param(exc.param, prefix)
        return GrpcRefusal(grpc.StatusCode.INVALID_ARGUMENT, f"{param}: {exc.message}" if param else exc.message)
    if exc.status == 503:
        return GrpcRefusal(grpc.StatusCode.UNAVAILABLE, exc.message)
    return GrpcRefusal(grpc.StatusCode.INTERNAL, exc.message)


def _proto_param(param: str | None, prefix: str) -> str | None:
    if param is None:
        return None
    if param.startswith("bootstrap_"):
        return f"disaggregated_params.{param}"
    if param in ("prompt", "messages", _PROMPT):
        return _PROMPT
    if param == "pd":
        return "disaggregated_params"
    return prefix + _PARAMS.get(param, param)


@dataclass(frozen=True)
class GeneratePlan:
    choices: list[PlannedChoice]
    pd: PDParams | None
    stream: bool


def plan_generate(request: Any, state: NodeState) -> GeneratePlan:
    """Validate a `GenerateRequest` and plan its engine requests; raises `GrpcRefusal`."""
    _refuse_unsupported(request)
    rid = request.request_id
    if not rid:
        raise GrpcRefusal(grpc.StatusCode.INVALID_ARGUMENT, "request_id: is empty; give each request an id")
    ids = [int(t) for t in request.tokenized.input_ids]
    sp = request.sampling_params
    n = sp.n or 1
    if n > MAX_N:
        raise GrpcRefusal(grpc.StatusCode.INVALID_ARGUMENT, f"sampling_params.n: {n} is above {MAX_N}")
    try:
        limits = state.limits
        headroom = check_prompt(ids, _PROMPT, limits)
        max_tokens = sp.max_new_tokens if sp.HasField("max_new_tokens") else min(SGLANG_DEFAULT_MAX_NEW_TOKENS, headroom)
        check_budget(len(ids), max_tokens, "max_tokens", limits)
        params = sampling_params(sp, max_tokens)
        pd = disaggregated_pd(request, state)
        state.backend.check_pd(pd)
    except APIError as exc:
        raise refusal_of(exc, "sampling_params.") from None
    choices = [PlannedChoice(i, f"{rid}-{i}" if n > 1 else rid, ids, params) for i in range(n)]
    return GeneratePlan(choices, pd, request.stream)


def _refuse_unsupported(request: Any) -> None:
    for name, what in _UNSUPPORTED:
        if getattr(request, name):
            raise GrpcRefusal(grpc.StatusCode.UNIMPLEMENTED, f"{name}: {what} are not supported by this server")
    if request.HasField("mm_inputs") and request.mm_inputs.ByteSize():
        raise GrpcRefusal(grpc.StatusCode.UNIMPLEMENTED, "mm_inputs: this server serves text-only models")
    sp = request.sampling_params
    constraint = sp.WhichOneof("constraint")
    if constraint is not None:
        raise GrpcRefusal(
            grpc.StatusCode.UNIMPLEMENTED, f"sampling_params.{constraint}: structured generation is not supported"
        )
    if sp.min_new_tokens:
        raise GrpcRefusal(grpc.StatusCode.UNIMPLEMENTED, "sampling_params.min_new_tokens: not supported; leave it 0")
    if sp.logit_bias:
        raise GrpcRefusal(grpc.StatusCode.UNIMPLEMENTED, "sampling_params.logit_bias: not supported; leave it empty")


def sampling_params(sp: Any, max_tokens: int) -> SamplingParams:
    """The engine's parameters from the proto's; 400-style errors name `sampling_params.FIELD`."""
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=sp.temperature,  # 0: greedy (smg always sends it, 1.0 when the client did not)
            top_p=sp.top_p or 1.0,
            top_k=sp.top_k if sp.top_k > 0 else None,
            min_p=sp.min_p,
            repetition_penalty=sp.repetition_penalty or 1.0,
            frequency_penalty=sp.frequency_penalty,
            presence_penalty=sp.presence_penalty,
            stop=tuple(sp.stop),
            stop_token_ids=tuple(sp.stop_token_ids),
            ignore_eos=sp.ignore_eos,
            skip_special_tokens=sp.skip_special_tokens,
        )
    except InvalidParameter as exc:
        param = _PARAMS.get(exc.param, exc.param)
        raise GrpcRefusal(grpc.StatusCode.INVALID_ARGUMENT, f"sampling_params.{param}: {exc}") from None


def disaggregated_pd(request: Any, state: NodeState) -> PDParams | None:
    """`disaggregated_params` -> our `pd`, exactly as smg's HTTP fields map (`with_sglang_pd`)."""
    if not request.HasField("disaggregated_params"):
        return None
    dp = request.disaggregated_params
    body = {
        "model": state.model_name,
        "prompt": [0],
        "bootstrap_host": dp.bootstrap_host or None,
        "bootstrap_port": dp.bootstrap_port or None,
        "bootstrap_room": dp.bootstrap_room & ROOM_MASK,
    }
    try:
        req = CompletionRequest.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = param_from_location(tuple(first["loc"])) or "disaggregated_params"
        raise GrpcRefusal(grpc.StatusCode.INVALID_ARGUMENT, f"{_proto_param(param, '')}: {first['msg']}") from None
    return with_sglang_pd(req, state.backend.role).pd


@dataclass
class ChoiceProgress:
    """One choice's output so far, for the cumulative counts and the complete message."""

    index: int
    output_ids: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    finish_reason: str | None = None
    stop: str | int | None = None

    def apply(self, delta: RequestDelta) -> None:
        self.output_ids.extend(delta.new_token_ids)
        self.prompt_tokens = delta.num_prompt_tokens or self.prompt_tokens
        self.cached_tokens = delta.num_cached_tokens or self.cached_tokens
        if delta.finished:
            self.finish_reason = delta.finish_reason or "stop"
            self.stop = delta.stop_reason


def chunk(rid: str, c: ChoiceProgress, new_ids: list[int]) -> Any:
    return pb.GenerateResponse(
        request_id=rid,
        chunk=pb.GenerateStreamChunk(
            token_ids=new_ids,
            prompt_tokens=c.prompt_tokens,
            completion_tokens=len(c.output_ids),
            cached_tokens=c.cached_tokens,
            index=c.index,
        ),
    )


def complete(rid: str, c: ChoiceProgress) -> Any:
    done = pb.GenerateComplete(
        output_ids=c.output_ids,
        finish_reason=c.finish_reason or "abort",
        prompt_tokens=c.prompt_tokens,
        completion_tokens=len(c.output_ids),
        cached_tokens=c.cached_tokens,
        index=c.index,
    )
    if isinstance(c.stop, str):
        done.matched_stop_str = c.stop
    elif isinstance(c.stop, int):
        done.matched_token_id = c.stop
    return pb.GenerateResponse(request_id=rid, complete=done)
