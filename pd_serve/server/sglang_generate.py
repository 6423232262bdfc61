"""SGLang's native `POST /generate` on every node: `text` or `input_ids` (one prompt or a list),
`sampling_params`, `stream`, and SGLang's router fields, served by the same path as `/v1/completions`.

- `GenerateRequest.completion` turns the body into a `CompletionRequest` (field names of SGLang's
  sampling params mapped onto ours; errors still name the field the client sent);
- `SGLangServing.generate` maps the router fields onto `pd`, tokenizes, and runs `OpenAIServing`'s own
  pipeline (admission, rooms, prefill answer, hang-up, refusals) with `GenerateFormat`, which shapes
  the answer as SGLang does: `{text, output_ids, meta_info}` (a list for several prompts or n > 1);
  streamed, one such object per event with the text so far, then `data: [DONE]`.

A prefill node answers with its usual JSON (room and timings), which smg reads whole and drops.
Nothing here touches the engine but through `OpenAIServing`.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi.responses import StreamingResponse
from pydantic import Field, ValidationError

from pd_serve.engine.messages import RequestDelta
from pd_serve.server.errors import bad_request
from pd_serve.server.formatting import ChoiceState, JSONResponse, ResponseFormat, Usage
from pd_serve.server.hangup import HangUpWatch
from pd_serve.server.schemas import CompletionRequest, Int64, SGLangPDFields, Text, _Body, param_from_location
from pd_serve.server.serving import OpenAIServing
from pd_serve.server.sglang_pd import with_sglang_pd

SGLANG_DEFAULT_MAX_NEW_TOKENS = 128  # SGLang's default when sampling_params leaves it out
_RENAMED = {"max_tokens": "max_new_tokens", "seed": "sampling_seed"}


class SamplingParamsBody(_Body):
    """SGLang's `sampling_params` (the subset the engine honours; unknown fields are ignored)."""

    max_new_tokens: int | None = SGLANG_DEFAULT_MAX_NEW_TOKENS
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: off
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: Text | list[Text] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    n: int = 1
    sampling_seed: Int64 | None = None


class GenerateRequest(SGLangPDFields):
    text: Text | Annotated[list[Text], Field(min_length=1)] | None = None
    input_ids: list[int] | Annotated[list[list[int]], Field(min_length=1)] | None = None
    sampling_params: SamplingParamsBody = Field(default_factory=SamplingParamsBody)
    stream: bool = False
    return_logprob: bool = False
    rid: Text | list[Text] | None = None

    @property
    def prompt_param(self) -> str:
        return "text" if self.text is not None else "input_ids"

    def is_batch(self) -> bool:
        ids = self.input_ids
        single = isinstance(self.text, str) or (ids is not None and not (ids and isinstance(ids[0], list)))
        return not single or self.sampling_params.n > 1

    def completion(self, model: str) -> CompletionRequest:
        if (self.text is None) == (self.input_ids is None):
            raise bad_request("text", "send exactly one of text and input_ids")
        if self.return_logprob:
            raise bad_request(
                "return_logprob", "return_logprob is not supported by this server; leave it false"
            )
        sp = self.sampling_params
        body = {
            **sp.model_dump(exclude={"max_new_tokens", "top_k", "sampling_seed"}),
            **self.model_dump(include={"bootstrap_host", "bootstrap_port", "bootstrap_room", "stream"}),
            "model": model,
            "prompt": self.text if self.text is not None else self.input_ids,
            "max_tokens": sp.max_new_tokens,
            "top_k": None if sp.top_k == -1 else sp.top_k,
            "seed": sp.sampling_seed,
        }
        try:
            return NativeCompletion.model_validate(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = param_from_location(tuple(first["loc"])) or "sampling_params"
            raise bad_request(_native_param(param), f"{param}: {first['msg']}") from None


class NativeCompletion(CompletionRequest):
    """A completion made from a `/generate` body: refusals name SGLang's fields."""

    def request_param(self, engine_param: str) -> str:
        return _native_param(super().request_param(engine_param))


def _native_param(param: str) -> str:
    if param in ("prompt", "model", "stream") or param.startswith("bootstrap_"):
        return {"prompt": "text"}.get(param, param)
    return f"sampling_params.{_RENAMED.get(param, param)}"


@dataclass(frozen=True)
class GenerateFormat(ResponseFormat):
    """SGLang's `/generate` answer shape; `output_ids` accumulate per choice while streaming."""

    batch: bool = False
    output_ids: dict[int, list[int]] = field(default_factory=dict)

    def response(
        self, choices: list[ChoiceState], usage: Usage, strings: Mapping[int, str], want_logprobs: bool
    ) -> Any:
        items = [self._item(c) for c in choices]
        return items if self.batch else items[0]

    def chunk(
        self,
        choice: ChoiceState,
        delta: RequestDelta,
        strings: Mapping[int, str],
        include_usage: bool,
        text_offset: int = 0,
    ) -> dict[str, Any]:
        ids = self.output_ids.setdefault(choice.index, [])
        ids.extend(delta.new_token_ids)
        item = self._item(choice, ids, delta.num_cached_tokens)
        return {**item, "index": choice.index} if self.batch else item

    def _item(self, c: ChoiceState, ids: list[int] | None = None, cached: int = 0) -> dict[str, Any]:
        meta = {
            "id": f"{self.response_id}-{c.index}",
            "finish_reason": _finish_reason(c),
            "prompt_tokens": c.num_prompt_tokens,
            "completion_tokens": c.num_output_tokens,
            "cached_tokens": cached,
            "weight_version": "default",
        }
        body: dict[str, Any] = {"text": c.text, "meta_info": meta}
        if ids is not None:
            body["output_ids"] = list(ids)
        return body


def _finish_reason(c: ChoiceState) -> dict[str, Any] | None:
    if c.finish_reason is None:
        return None
    if c.finish_reason == "length":
        return {"type": "length", "length": c.num_output_tokens}
    return {"type": c.finish_reason}


class SGLangServing(OpenAIServing):
    """`/generate` on top of the OpenAI pipeline."""

    async def generate(
        self, body: GenerateRequest, hung_up: HangUpWatch | None = None
    ) -> JSONResponse | StreamingResponse:
        req = with_sglang_pd(body.completion(self.state.model_name), self.state.backend.role)
        self._refuse_early(req)
        tok = self.state.tokenizer
        prompts = [p if isinstance(p, list) else await tok.encode(p) for p in req.prompts()]
        fmt = GenerateFormat(
            chat=False,
            response_id=f"gen-{uuid.uuid4().hex}",
            model=self.state.model_name,
            batch=body.is_batch(),
        )
        return await self._serve(req, fmt, prompts, body.prompt_param, hung_up)
