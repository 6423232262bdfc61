"""One OpenAI request -> one planned engine request per (prompt, choice), refused here with a 400 where
the engine would refuse it (an empty prompt, a token outside the vocabulary, more tokens than the
context or the KV cache holds). Pure: it reads the `EngineLimits`, never the engine.

Words: a prompt's *headroom* is what the context leaves for output (`max_model_len - prompt`); a
*room* is only ever a transfer room (`PDParams.room`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pd_serve.engine.sampling_params import SamplingParams
from pd_serve.openai_errors import ErrorCode
from pd_serve.server.errors import bad_request
from pd_serve.server.schemas import PDParams, _GenerationRequest
from pd_serve.server.state import EngineLimits


@dataclass(frozen=True)
class PlannedChoice:
    index: int
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


def plan(
    req: _GenerationRequest, prompts: Sequence[list[int]], prompt_param: str, rid: str, limits: EngineLimits
) -> list[PlannedChoice]:
    """One engine request per (prompt, choice); refuses here what the engine would refuse."""
    requested, name = req.requested_max_tokens()
    planned = []
    for p_idx, ids in enumerate(prompts):
        headroom = check_prompt(ids, prompt_param, limits)
        max_tokens = headroom if requested is None else requested
        for j in range(req.n):
            seed = None if req.seed is None else req.seed + j
            params = req.sampling_params(max_tokens, seed)
            check_budget(len(ids), max_tokens, name, limits)
            index = p_idx * req.n + j
            planned.append(PlannedChoice(index, f"{rid}-{index}", ids, params))
    return planned


def check_prompt(ids: list[int], param: str, limits: EngineLimits) -> int:
    """Validate a prompt's tokens; returns its headroom: the tokens left for output in the context."""
    if not ids:
        raise bad_request(param, "the prompt is empty")
    bad = next((t for t in ids if not 0 <= t < limits.vocab_size), None)
    if bad is not None:
        raise bad_request(param, f"token id {bad} is outside the vocabulary (0..{limits.vocab_size - 1})")
    headroom = limits.max_model_len - len(ids)
    if headroom < 1:
        raise bad_request(
            param,
            f"the prompt has {len(ids)} tokens; the context length is {limits.max_model_len} "
            "(--max-model-len), which leaves no room for output",
            code=ErrorCode.CONTEXT_LENGTH_EXCEEDED,
        )
    return headroom


def check_budget(prompt_len: int, max_tokens: int, name: str, limits: EngineLimits) -> None:
    total = prompt_len + max_tokens
    if total > limits.max_model_len:
        raise bad_request(
            name,
            f"prompt ({prompt_len} tokens) + {name} ({max_tokens}) = {total} exceeds the context "
            f"length {limits.max_model_len} (--max-model-len)",
            code=ErrorCode.CONTEXT_LENGTH_EXCEEDED,
        )
    if total > limits.kv_capacity_tokens:
        raise bad_request(
            name,
            f"prompt ({prompt_len} tokens) + {name} ({max_tokens}) = {total} exceeds the KV cache "
            f"of {limits.kv_capacity_tokens} tokens (--max-total-tokens or --kv-cache-memory)",
            code=ErrorCode.CONTEXT_LENGTH_EXCEEDED,
        )


def choice_pd(pd: PDParams | None, index: int) -> PDParams | None:
    """Choice i of a request (n > 1, or several prompts) uses room + i: both nodes derive the same rooms."""
    if pd is None or index == 0:
        return pd
    return pd.model_copy(update={"room": (pd.room + index) % (1 << 63)})
