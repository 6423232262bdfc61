"""Node server pieces without a server: request schemas, parameter mapping, formatting, config."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from pydantic import ValidationError

from pd_serve.engine.messages import RequestDelta, TokenLogprob
from pd_serve.server.cli import add_arguments, configs_from_args
from pd_serve.server.config import ServerConfig, ServerConfigError
from pd_serve.server.errors import APIError
from pd_serve.server.formatting import ChoiceState, ResponseFormat, Usage
from pd_serve.server.schemas import ChatCompletionRequest, CompletionRequest, param_from_location
from pd_serve.server.state import NodeAdmission

CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}


def test_chat_request_accepts_openai_extras_and_text_parts() -> None:
    req = ChatCompletionRequest(**CHAT | {"user": "u", "metadata": {"a": 1}, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]})
    assert req.messages[0].text() == "ab"
    assert req.sampling_params(5, None).max_tokens == 5


def test_max_completion_tokens_wins_and_is_named_in_errors() -> None:
    req = ChatCompletionRequest(**CHAT | {"max_tokens": 9, "max_completion_tokens": 0})
    assert req.requested_max_tokens() == (0, "max_completion_tokens")
    with pytest.raises(APIError) as err:
        req.sampling_params(0, None)
    assert err.value.status == 400 and err.value.param == "max_completion_tokens"


@pytest.mark.parametrize("field,value", [("temperature", -1.0), ("top_p", 0.0), ("top_p", 1.5), ("min_p", 2.0)])
def test_value_errors_name_their_field(field: str, value: float) -> None:
    with pytest.raises(APIError) as err:
        CompletionRequest(model="demo", prompt="x", **{field: value}).sampling_params(4, None)
    assert err.value.param == field


def test_top_logprobs_maps_and_is_checked() -> None:
    req = ChatCompletionRequest(**CHAT | {"logprobs": True, "top_logprobs": 3})
    assert req.sampling_params(2, None).logprobs == 3
    with pytest.raises(APIError) as err:
        ChatCompletionRequest(**CHAT | {"logprobs": True, "top_logprobs": 50}).sampling_params(2, None)
    assert err.value.param == "top_logprobs"
    with pytest.raises(APIError):
        ChatCompletionRequest(**CHAT | {"top_logprobs": 2}).check_supported()


def test_unsupported_fields_are_refused() -> None:
    with pytest.raises(APIError, match="logit_bias"):
        ChatCompletionRequest(**CHAT | {"logit_bias": {"1": 2.0}}).check_supported()
    ChatCompletionRequest(**CHAT | {"logit_bias": {}}).check_supported()
    with pytest.raises(APIError, match="echo"):
        CompletionRequest(model="demo", prompt="x", echo=True).check_supported()


def test_prompt_shapes() -> None:
    assert CompletionRequest(model="m", prompt="a").prompts() == ["a"]
    assert CompletionRequest(model="m", prompt=["a", "b"]).prompts() == ["a", "b"]
    assert CompletionRequest(model="m", prompt=[1, 2]).prompts() == [[1, 2]]
    assert CompletionRequest(model="m", prompt=[[1], [2, 3]]).prompts() == [[1], [2, 3]]


def test_schema_errors_point_at_fields() -> None:
    with pytest.raises(ValidationError) as err:
        ChatCompletionRequest(model="m", messages=[])
    assert param_from_location(("body", *err.value.errors()[0]["loc"])) == "messages"
    assert param_from_location(("body", "messages", 0, "role")) == "messages[0].role"
    assert param_from_location(("body", "prompt", "list[int]", 0)) == "prompt"
    assert param_from_location(("body",)) is None
    with pytest.raises(ValidationError):
        ChatCompletionRequest(**CHAT | {"pd": {"room": -1, "prefill": "p", "decode": "d"}})


def test_chat_formatting_stream_and_whole() -> None:
    fmt = ResponseFormat(chat=True, response_id="chatcmpl-1", model="demo", created=7)
    choice = ChoiceState(0)
    lp = [TokenLogprob(5, -0.5, [(5, -0.5), (6, -1.0)])]
    first = fmt.chunk(choice, RequestDelta("r", [5], "he", logprobs=lp), {5: "he", 6: "x"}, include_usage=True)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "he"} and first["usage"] is None
    assert first["choices"][0]["logprobs"]["content"][0]["top_logprobs"][1] == {"token": "x", "logprob": -1.0, "bytes": [120]}
    choice.apply(RequestDelta("r", [5], "he", num_prompt_tokens=3, num_output_tokens=1))
    last = RequestDelta("r", [], "", finished=True, finish_reason="stop", num_prompt_tokens=3, num_output_tokens=1)
    end = fmt.chunk(choice, last, {}, include_usage=False)
    assert end["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    choice.apply(last)
    whole = fmt.response([choice], Usage(3, 1), {}, want_logprobs=False)
    assert whole["object"] == "chat.completion" and whole["choices"][0]["message"]["content"] == "he"
    assert whole["usage"] == {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
    assert fmt.usage_chunk(Usage(3, 1))["choices"] == []


def test_completion_logprobs_offsets() -> None:
    fmt = ResponseFormat(chat=False, response_id="cmpl-1", model="demo")
    block = fmt.logprobs_block([TokenLogprob(1, -1.0), TokenLogprob(2, -2.0)], {1: "ab", 2: "c"}, offset=4)
    assert block == {"tokens": ["ab", "c"], "token_logprobs": [-1.0, -2.0], "top_logprobs": [{}, {}], "text_offset": [4, 6]}


def test_admission_limit_and_ticket_release() -> None:
    adm = NodeAdmission(3)
    ticket = adm.acquire(2)
    with pytest.raises(APIError) as err:
        adm.acquire(2)
    assert err.value.status == 503 and "Retry-After" in err.value.headers
    ticket.release_one()
    ticket.release_all()
    ticket.release_all()
    assert adm.in_flight == 0


def test_server_config_validation() -> None:
    with pytest.raises(ServerConfigError, match="--port"):
        ServerConfig(port=70000)
    with pytest.raises(ServerConfigError, match="--ssl-certfile"):
        ServerConfig(ssl_certfile="/nonexistent.pem")
    assert "secret" not in repr(ServerConfig(api_key="secret"))


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_yaml_config_fills_defaults_and_flags_win(tmp_path: Path) -> None:
    cfg = tmp_path / "node.yaml"
    cfg.write_text("port: 31000\nmax-model-len: 512\nmax_queued_requests: 7\n")
    engine, server = configs_from_args(_parse(["--config", str(cfg), "--port", "32000"]))
    assert server.port == 32000 and server.max_queued_requests == 7 and engine.max_model_len == 512
    cfg.write_text("no_such_flag: 1\n")
    with pytest.raises(ServerConfigError, match="no_such_flag"):
        configs_from_args(_parse(["--config", str(cfg)]))
