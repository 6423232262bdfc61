"""What the offline API returns: one `RequestOutput` per prompt, accumulated from engine deltas."""

from __future__ import annotations

from dataclasses import dataclass, field

from pd_serve.engine.messages import RequestDelta, TokenLogprob


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] | None = None
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def apply(self, delta: RequestDelta) -> None:
        self.token_ids += delta.new_token_ids
        self.text += delta.new_text
        self.num_cached_tokens = delta.num_cached_tokens
        if delta.logprobs is not None:
            self.logprobs = (self.logprobs or []) + delta.logprobs
        if delta.finished:
            self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason
