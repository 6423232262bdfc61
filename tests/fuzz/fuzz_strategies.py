"""Hypothesis strategies for the fuzz tests, built from our request schemas.

A generated OpenAI request is a small valid request (max_tokens 1-2, n 1-2: the ones that pass
cost the engine little), plus some optional fields drawn in range, plus at most one field broken:
set to a hostile value (wrong type, out of range, null, huge, NaN, a lone surrogate...). The
field names come from the pydantic models in `pd_serve.server.schemas` and
`pd_serve.bootstrap.records`, so a field added there is fuzzed without touching this file.
The broken field's name travels with the body: a 400 must name it.
"""

from __future__ import annotations

import math
from typing import Any

from fuzz_support import MODEL
from hypothesis import strategies as st

from pd_serve.bootstrap.records import Capacity, KVLayoutRecord, Load, NodeRegistration, TransferEndpoint
from pd_serve.server.schemas import ChatCompletionRequest, CompletionRequest

INT64 = 2**63
# Values that broke, or could break, something once: each stays in the pool.
HOSTILE_SCALARS: list[Any] = [
    None, True, False, 0, -1, 1, 2, -(INT64 + 1), -INT64, INT64 - 1, INT64, 2**64, 10**100,
    0.5, -0.0, 1e308, -1e308, 5e-324, 1e-320, math.nan, math.inf, -math.inf,
    "", " ", "x", "1", "NaN", "Infinity", "-inf", "true", "\ud800", "a\udfffb", "\x00", "\u202e", "9" * 400,
    [], [None], [[]], [[[]]], {}, {"a": 1}, {"type": "text"}, [{"type": "text", "text": 1}],
    ["x"] * 300, list(range(300)),
]

hostile = st.one_of(
    st.sampled_from(HOSTILE_SCALARS),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.one_of(st.none(), st.integers(), st.text(max_size=4)), max_size=4),
    st.dictionaries(st.text(max_size=6), st.one_of(st.none(), st.integers(), st.text(max_size=4)), max_size=3),
)

short_text = st.text(max_size=16)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant"])},
    optional={"content": st.one_of(short_text, st.lists(
        st.fixed_dictionaries({"type": st.just("text"), "text": short_text}), max_size=3))},
)

# In-range values for optional fields; a field left out here is only ever sent broken.
_COMMON_VALID: dict[str, st.SearchStrategy[Any]] = {
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "top_k": st.integers(1, 64),
    "min_p": st.floats(0, 1),
    "n": st.integers(1, 2),
    "stop": st.one_of(short_text.filter(bool), st.lists(short_text.filter(bool), max_size=4)),
    "stop_token_ids": st.lists(st.integers(0, 437), max_size=4),
    "seed": st.integers(-INT64, INT64 - 1),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.1, 2),
    "ignore_eos": st.booleans(),
    "skip_special_tokens": st.booleans(),
    "user": short_text,
    "stream": st.booleans(),
    "logit_bias": st.just({}),
}
CHAT_VALID = {**_COMMON_VALID, "logprobs": st.booleans(), "add_generation_prompt": st.booleans()}
COMPLETION_VALID = {**_COMMON_VALID, "logprobs": st.integers(0, 5), "echo": st.just(False)}

CHAT_FIELDS = sorted(ChatCompletionRequest.model_fields)
COMPLETION_FIELDS = sorted(CompletionRequest.model_fields)


def _valid_subset(valid: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional=valid)


@st.composite
def openai_request(draw: st.DrawFn, chat: bool) -> tuple[dict[str, Any], str | None]:
    """(body, the broken field or None)."""
    if chat:
        body: dict[str, Any] = {"model": MODEL, "messages": draw(st.lists(message, min_size=1, max_size=3))}
        valid, fields = CHAT_VALID, CHAT_FIELDS
    else:
        prompt = st.one_of(short_text.filter(bool), st.lists(st.integers(0, 437), min_size=1, max_size=8),
                           st.lists(short_text.filter(bool), min_size=1, max_size=3))
        body = {"model": MODEL, "prompt": draw(prompt)}
        valid, fields = COMPLETION_VALID, COMPLETION_FIELDS
    body["max_tokens"] = draw(st.integers(1, 2))
    body.update(draw(_valid_subset(valid)))
    if body.get("stream"):
        body.update(draw(st.fixed_dictionaries({}, optional={"stream_options": st.fixed_dictionaries(
            {"include_usage": st.booleans()})})))
    broken: str | None = None
    mode = draw(st.sampled_from(["field", "field", "field", "unknown", "none"]))
    if mode == "field":
        broken = draw(st.sampled_from(fields))
        body[broken] = draw(hostile)
    elif mode == "unknown":
        body[draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in fields))] = draw(hostile)
    return body, broken


# ---- bootstrap ------------------------------------------------------------------------------------
def registration_body() -> dict[str, Any]:
    return {
        "role": "prefill",
        "http_url": "http://127.0.0.1:9001",
        "transfer": [{"backend": "tcp", "address": "127.0.0.1:17000"}],
        "layout": {"architecture": "LlamaForCausalLM", "num_layers": 2, "num_kv_heads": 2, "head_dim": 8,
                   "dtype": "float32", "page_size": 16, "config_hash": "cafe01"},
        "capacity": {"total_pages": 128, "max_running_requests": 8},
        "load": {"running": 0, "waiting": 0, "free_pages": 128},
    }


# Every field path of a registration, from the record models: "role", "layout.page_size", ...
_NESTED = {"layout": KVLayoutRecord, "capacity": Capacity, "load": Load}
REGISTRATION_PATHS = sorted(
    [name for name in NodeRegistration.model_fields]
    + [f"{top}.{name}" for top, model in _NESTED.items() for name in model.model_fields]
    + [f"transfer.0.{name}" for name in TransferEndpoint.model_fields]
)
node_id = st.one_of(
    st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,20}\Z"),
    st.text(min_size=1, max_size=140).filter(lambda s: "/" not in s and "?" not in s and "#" not in s),
)


@st.composite
def registration(draw: st.DrawFn) -> tuple[dict[str, Any], str | None]:
    """(PUT body, the broken field path as the service names it, or None)."""
    body = registration_body()
    body["role"] = draw(st.sampled_from(["prefill", "decode", "colocated"]))
    mode = draw(st.sampled_from(["field", "field", "drop", "unknown", "none"]))
    path: str | None = None
    if mode in ("field", "drop"):
        path = draw(st.sampled_from(REGISTRATION_PATHS))
        parent: Any = body
        keys = path.split(".")
        for key in keys[:-1]:
            parent = parent[int(key)] if key.isdigit() else parent[key]
        if mode == "field":
            parent[keys[-1]] = draw(hostile)
        else:
            parent.pop(keys[-1], None)
    elif mode == "unknown":
        body[draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in body))] = draw(hostile)
    return body, path
