"""In-process fuzzing of the node's request schemas down to the engine message codec (no server).

Property: a body either is refused with a 400 that names a field (pydantic's ValidationError, or an
`APIError` from `check_supported` / `sampling_params`), or its `SamplingParams` (and `pd` room)
cross the API -> engine codec unchanged. Infinity once passed here, crossed the codec as null and
killed the engine; 2**64 seeds made the codec raise (a 500).
"""

from __future__ import annotations

import json
from typing import Any

from fuzz_strategies import hostile, openai_request
from fuzz_support import MODEL, fuzz_settings
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from pd_serve.engine import messages as m
from pd_serve.server.errors import APIError
from pd_serve.server.schemas import ChatCompletionRequest, CompletionRequest, param_from_location

NUMERIC = ["max_tokens", "temperature", "top_p", "top_k", "min_p", "n", "seed", "presence_penalty",
           "frequency_penalty", "repetition_penalty", "top_logprobs", "logprobs", "max_completion_tokens"]
numbers = st.one_of(st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "9" * 30]))


def _through_the_codec(cls: type[ChatCompletionRequest] | type[CompletionRequest], body: dict[str, Any]) -> None:
    data = json.loads(json.dumps(body, allow_nan=True))  # as the node's JSON parser reads it
    try:
        req = cls.model_validate(data)
        req.check_supported()
        requested, _ = req.requested_max_tokens()
        params = [req.sampling_params(requested or 1, None if req.seed is None else req.seed + j) for j in range(req.n)]
    except ValidationError as exc:
        first = exc.errors()[0]
        assert param_from_location(("body", *first["loc"])) is not None, exc
        return
    except APIError as exc:
        assert exc.status == 400 and exc.param, exc
        return
    room = req.pd.room if req.pd is not None else None
    for p in params:
        sent = m.AddRequest("r", [1, 2], p, None if room is None else m.PDSpec(room))
        assert m.decode(m.encode(sent)) == sent


@fuzz_settings(200)
@given(openai_request(chat=True))
def test_chat_bodies_are_refused_or_cross_the_codec(case: tuple[dict[str, Any], str | None]) -> None:
    _through_the_codec(ChatCompletionRequest, case[0])


@fuzz_settings(200)
@given(openai_request(chat=False))
def test_completion_bodies_are_refused_or_cross_the_codec(case: tuple[dict[str, Any], str | None]) -> None:
    _through_the_codec(CompletionRequest, case[0])


@fuzz_settings(200)
@given(st.dictionaries(st.sampled_from(NUMERIC), numbers, min_size=1, max_size=4), st.booleans(),
       st.one_of(st.none(), st.fixed_dictionaries({"room": st.integers(), "prefill": hostile, "decode": st.text()})))
def test_numbers_anywhere(fields: dict[str, Any], chat: bool, pd: Any) -> None:
    body: dict[str, Any] = {"model": MODEL, **fields}
    if fields.get("top_logprobs") is not None:
        body["logprobs"] = True
    if pd is not None:
        body["pd"] = pd
    if chat:
        _through_the_codec(ChatCompletionRequest, {**body, "messages": [{"role": "user", "content": "x"}]})
    else:
        _through_the_codec(CompletionRequest, {**body, "prompt": "x"})
