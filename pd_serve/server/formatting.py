"""OpenAI response bodies and stream chunks, built from engine `RequestDelta`s.

`ChoiceState` accumulates one choice (text, token count, finish reason, logprobs); `ResponseFormat`
turns choices into the chat (`chat.completion`, `chat.completion.chunk`) or text
(`text_completion`) shapes. Pure functions of their inputs: no I/O, no tokenizer (token strings for
logprobs are looked up by the caller and passed in).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.responses import Response

from pd_serve.engine.messages import RequestDelta, TokenLogprob

SSE_DONE = b"data: [DONE]\n\n"


class JSONResponse(Response):
    """A JSON response serialized with orjson (FastAPI's ORJSONResponse is deprecated)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def sse(payload: Mapping[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def to_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


@dataclass
class ChoiceState:
    """One choice as it grows: the text so far, its counts, and how it ended."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    role_sent: bool = False  # streaming chat: the first chunk carries the role

    def apply(self, delta: RequestDelta) -> None:
        self.text += delta.new_text
        self.num_prompt_tokens = delta.num_prompt_tokens or self.num_prompt_tokens
        self.num_output_tokens = delta.num_output_tokens or self.num_output_tokens
        if delta.logprobs:
            self.logprobs.extend(delta.logprobs)
        if delta.finished:
            self.finish_reason = delta.finish_reason or "stop"


def logprob_token_ids(logprobs: list[TokenLogprob]) -> set[int]:
    """Every token id whose text a logprobs block shows."""
    ids = {lp.token_id for lp in logprobs}
    for lp in logprobs:
        ids.update(t for t, _ in lp.top)
    return ids


def _token_entry(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(logprobs: list[TokenLogprob], strings: Mapping[int, str]) -> dict[str, Any]:
    return {
        "content": [
            {
                **_token_entry(strings[lp.token_id], lp.logprob),
                "top_logprobs": [_token_entry(strings[t], v) for t, v in lp.top],
            }
            for lp in logprobs
        ]
    }


def completion_logprobs(logprobs: list[TokenLogprob], strings: Mapping[int, str], offset: int) -> dict[str, Any]:
    tokens = [strings[lp.token_id] for lp in logprobs]
    offsets = []
    for tok in tokens:
        offsets.append(offset)
        offset += len(tok)
    return {
        "tokens": tokens,
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": [{strings[t]: v for t, v in lp.top} for lp in logprobs],
        "text_offset": offsets,
    }


@dataclass(frozen=True)
class ResponseFormat:
    """The envelope of one response: which API, its id, creation time and model name."""

    chat: bool
    response_id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    def _envelope(self, chunk: bool) -> dict[str, Any]:
        if self.chat:
            kind = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            kind = "text_completion"
        return {"id": self.response_id, "object": kind, "created": self.created, "model": self.model}

    def logprobs_block(
        self, logprobs: list[TokenLogprob] | None, strings: Mapping[int, str], offset: int = 0
    ) -> dict[str, Any] | None:
        if not logprobs:
            return None
        return chat_logprobs(logprobs, strings) if self.chat else completion_logprobs(logprobs, strings, offset)

    def response(
        self, choices: list[ChoiceState], usage: Usage, strings: Mapping[int, str], want_logprobs: bool
    ) -> dict[str, Any]:
        """The whole non-streamed body."""
        out = []
        for c in choices:
            lps = self.logprobs_block(c.logprobs, strings) if want_logprobs else None
            body: dict[str, Any] = {"index": c.index}
            if self.chat:
                body["message"] = {"role": "assistant", "content": c.text}
            else:
                body["text"] = c.text
            out.append({**body, "logprobs": lps, "finish_reason": c.finish_reason})
        return {**self._envelope(chunk=False), "choices": out, "usage": usage.to_dict()}

    def chunk(
        self,
        choice: ChoiceState,
        delta: RequestDelta,
        strings: Mapping[int, str],
        include_usage: bool,
        text_offset: int = 0,
    ) -> dict[str, Any]:
        """One streamed chunk for one delta of one choice."""
        lps = self.logprobs_block(delta.logprobs, strings, text_offset)
        finish = delta.finish_reason if delta.finished else None
        body: dict[str, Any] = {"index": choice.index}
        if self.chat:
            content: dict[str, Any] = {}
            if not choice.role_sent:
                content["role"] = "assistant"
                choice.role_sent = True
            if delta.new_text or not delta.finished:
                content["content"] = delta.new_text
            body["delta"] = content
        else:
            body["text"] = delta.new_text
        chunk = {**self._envelope(chunk=True), "choices": [{**body, "logprobs": lps, "finish_reason": finish}]}
        if include_usage:
            chunk["usage"] = None
        return chunk

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        """The last chunk of a stream with `stream_options.include_usage`: no choices, the usage."""
        return {**self._envelope(chunk=True), "choices": [], "usage": usage.to_dict()}
