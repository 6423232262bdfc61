"""OpenAI request bodies (pydantic) and their translation into engine `SamplingParams`.

Models check types and shapes only; value ranges are `SamplingParams`' job, whose
`InvalidParameter` names the engine field, mapped back here to the request field the client sent
(`max_completion_tokens`, `top_logprobs`). Unknown top-level fields are accepted and ignored, as
OpenAI clients send many; known fields we cannot honour (non-empty `logit_bias`, `echo`, tools) are
refused with a 400 naming them. Strings must be valid Unicode (a JSON `\ud800` escape decodes to a
lone surrogate that neither the tokenizer nor the engine codec can take), and integers the engine
receives must fit in 64 bits. Nothing here touches the tokenizer or the engine.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from pd_serve.engine.sampling_params import INT64_MAX, INT64_MIN, InvalidParameter, SamplingParams
from pd_serve.server.errors import bad_request

MAX_N = 128


def _unicode(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"contains an unpaired surrogate at position {exc.start}; send valid Unicode") from None
    return value


Text = Annotated[str, AfterValidator(_unicode)]
Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
Room = Annotated[int, Field(ge=0, lt=2**63)]  # a transfer room id: 63 bits, as SGLang draws them


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class PDParams(_Body):
    """Which prefill/decode pair serves a disaggregated request, and its transfer room."""

    model_config = ConfigDict(extra="forbid")
    room: Room
    prefill: Text
    decode: Text
    prefill_url: Text | None = None  # without a bootstrap service: where the decode node finds the prefill node


# SGLang's router fields (smg in PD mode), each a scalar or one value per prompt/choice;
# `sglang_pd.with_sglang_pd` maps them onto `pd`. A body with any of them needs the cluster token.
SGLANG_PD_FIELDS = ("bootstrap_host", "bootstrap_port", "bootstrap_room")


class SGLangPDFields(_Body):
    bootstrap_host: Text | list[Text | None] | None = None
    bootstrap_port: Annotated[int, Field(ge=0, le=65535)] | list[int | None] | None = None
    bootstrap_room: Room | list[Room] | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: Text


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class _GenerationRequest(SGLangPDFields):
    """Fields shared by chat and text completions."""

    model: Text
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float = 0.0
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stop: Text | list[Text] | None = None
    stop_token_ids: list[int] | None = None
    seed: Int64 | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    user: Text | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    pd: PDParams | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.include_usage

    def requested_max_tokens(self) -> tuple[int | None, str]:
        return self.max_tokens, "max_tokens"

    def requested_logprobs(self) -> int | None:
        return None

    def num_prompts(self) -> int:
        return 1

    def check_supported(self) -> None:
        if self.logit_bias:
            raise bad_request("logit_bias", "logit_bias is not supported; send it empty or leave it out")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options", "stream_options is only allowed with stream=true")

    def sampling_params(self, max_tokens: int, seed: int | None) -> SamplingParams:
        """Engine parameters for one choice; raises APIError(400) naming the request field."""
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if seed is not None:  # choice j of n is seeded seed + j: wrap that back into 64 bits
            seed = (seed - INT64_MIN) % 2**64 + INT64_MIN
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=self.top_k,
                min_p=self.min_p,
                repetition_penalty=self.repetition_penalty,
                frequency_penalty=self.frequency_penalty,
                presence_penalty=self.presence_penalty,
                seed=seed,
                stop=stop,
                stop_token_ids=tuple(self.stop_token_ids or ()),
                ignore_eos=self.ignore_eos,
                logprobs=self.requested_logprobs(),
                skip_special_tokens=self.skip_special_tokens,
            )
        except InvalidParameter as exc:
            param = self.request_param(exc.param)
            raise bad_request(param, str(exc).replace(exc.param, param, 1)) from exc

    def request_param(self, engine_param: str) -> str:
        if engine_param == "max_tokens":
            return self.requested_max_tokens()[1]
        return engine_param


class ChatCompletionRequest(_GenerationRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    add_generation_prompt: bool = True

    def requested_max_tokens(self) -> tuple[int | None, str]:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    def requested_logprobs(self) -> int | None:
        if not self.logprobs:
            return None
        return self.top_logprobs or 0

    def check_supported(self) -> None:
        super().check_supported()
        if self.tools:
            raise bad_request("tools", "tool calling is not supported by this server")
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs", "top_logprobs needs logprobs=true")

    def request_param(self, engine_param: str) -> str:
        if engine_param == "logprobs" and self.top_logprobs is not None:
            return "top_logprobs"
        return super().request_param(engine_param)


PromptInput = Text | list[Text] | list[int] | list[list[int]]


class CompletionRequest(_GenerationRequest):
    prompt: PromptInput
    logprobs: int | None = None
    echo: bool = False
    suffix: Text | None = None

    def requested_logprobs(self) -> int | None:
        return self.logprobs

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise bad_request("echo", "echo is not supported by this server")
        if self.suffix:
            raise bad_request("suffix", "suffix is not supported by this server")
        if isinstance(self.prompt, list) and not self.prompt:
            raise bad_request("prompt", "prompt must not be an empty list")

    def num_prompts(self) -> int:
        p = self.prompt
        return 1 if isinstance(p, str) or all(isinstance(x, int) for x in p) else len(p)

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of prompts, each a string or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [[x for x in p if isinstance(x, int)]]
        return [x for x in p if isinstance(x, str | list)]


def param_from_location(loc: tuple[int | str, ...]) -> str | None:
    """The request field a pydantic error location points at ('body', 'messages', 0, ...) -> 'messages'."""
    parts = [p for p in loc if p != "body"]
    if not parts or isinstance(parts[0], int):  # ('body', 0): the body is not JSON at all
        return None
    name = str(parts[0])
    for p in parts[1:]:
        if isinstance(p, int):
            name += f"[{p}]"
        elif p in ("role", "content", "include_usage", "room", "prefill", "decode", "text", "type"):
            name += f".{p}"
        else:
            break  # union branch tags such as 'str' or 'list[int]'
    return name
