"""`pd-serve colocated` end to end: the official openai client and httpx against a real server.

One server for the module (starting one costs seconds of torch and transformers imports). The
last test kills its engine with SIGKILL, so it must stay last.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from server_helpers import NodeProcess, sse_events, wait_until

from pd_serve import LLM, SamplingParams

KEY = "test-key-123"
MAX_BYTES = 65536
MAX_TOTAL_TOKENS = 8192
RUNNING, QUEUED = 16, 48  # admission limit 64: the 64-stream test just fits
HDRS = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def node() -> Iterator[NodeProcess]:
    proc = NodeProcess([
        "--api-key", KEY, "--max-request-bytes", str(MAX_BYTES), "--max-total-tokens", str(MAX_TOTAL_TOKENS),
        "--max-running-requests", str(RUNNING), "--max-queued-requests", str(QUEUED),
    ])
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(node: NodeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{node.url}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(node: NodeProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=node.url, headers=HDRS, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def offline(demo_dir: Path) -> LLM:
    return LLM(model=str(demo_dir), max_total_tokens=MAX_TOTAL_TOKENS, show_progress=False)


def _chat_ids(llm: LLM, content: str) -> list[int]:
    text = llm.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    return list(llm.tokenizer.encode(text, add_special_tokens=False))


def _post(http: httpx.Client, path: str, body: dict[str, Any], **kw: Any) -> httpx.Response:
    return http.post(path, json=body, **kw)


def _assert_error(r: httpx.Response, status: int, param: str | None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and err["message"]
    return err


# ---- generation ------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_chat_stream_equals_non_stream_equals_offline(client: openai.OpenAI, offline: LLM, temperature: float) -> None:
    args: dict[str, Any] = dict(model="demo", messages=[{"role": "user", "content": "the scheduler moves"}],
                                max_tokens=12, temperature=temperature, seed=7, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**args)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **args))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    ids = _chat_ids(offline, "the scheduler moves")
    expected = offline.generate([ids], SamplingParams(max_tokens=12, temperature=temperature, seed=7, ignore_eos=True))
    assert whole.choices[0].message.content == streamed == expected[0].text
    assert whole.choices[0].finish_reason == "length" and whole.choices[0].message.role == "assistant"
    assert whole.id.startswith("chatcmpl-") and whole.object == "chat.completion" and whole.model == "demo"
    assert whole.usage.prompt_tokens == len(ids) and whole.usage.completion_tokens == 12
    assert whole.usage.total_tokens == len(ids) + 12
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-2].choices[0].finish_reason == "length"


def test_completions_stream_non_stream_and_token_prompts(client: openai.OpenAI, offline: LLM) -> None:
    prompt = "a request waits for"
    args: dict[str, Any] = dict(model="demo", max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(prompt=prompt, **args)
    streamed = "".join(c.choices[0].text for c in client.completions.create(prompt=prompt, stream=True, **args))
    ids = list(offline.tokenizer.encode(prompt))
    expected = offline.generate([ids], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0].text
    assert whole.choices[0].text == streamed == expected
    assert whole.object == "text_completion" and whole.usage.prompt_tokens == len(ids)
    by_ids = client.completions.create(prompt=ids, **args)
    assert by_ids.choices[0].text == expected
    several = client.completions.create(prompt=[prompt, "the cache"], **args)
    assert [c.index for c in several.choices] == [0, 1] and several.choices[0].text == expected
    assert several.usage.completion_tokens == 20


def test_n2_gives_two_choices_with_derived_seeds(client: openai.OpenAI) -> None:
    args: dict[str, Any] = dict(model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=8, seed=11,
                                extra_body={"ignore_eos": True})
    two = client.chat.completions.create(n=2, **args)
    one = client.chat.completions.create(n=1, **args)
    assert sorted(c.index for c in two.choices) == [0, 1]
    assert two.choices[0].message.content == one.choices[0].message.content
    assert two.usage.completion_tokens == 16 and two.usage.prompt_tokens == one.usage.prompt_tokens
    chunks = list(client.chat.completions.create(n=2, stream=True, **args))
    texts = {i: "".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == i) for i in (0, 1)}
    assert texts == {c.index: c.message.content for c in two.choices}


def test_logprobs_chat(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                       logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 2 for t in content)


def test_http2_prior_knowledge(node: NodeProcess) -> None:
    with httpx.Client(http1=False, http2=True, headers=HDRS, timeout=60) as c:
        r = c.get(f"{node.url}/v1/models")
    assert r.status_code == 200 and r.http_version == "HTTP/2"
    assert r.json()["data"][0]["id"] == "demo"


def test_64_concurrent_streams(node: NodeProcess, offline: LLM) -> None:
    prompts = [f"request {i} sends the room" for i in range(64)]
    expected = offline.generate(prompts, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))

    def one(prompt: str) -> str:
        body = {"model": "demo", "prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{node.url}/v1/completions", json=body, headers=HDRS, timeout=180) as r:
            assert r.status_code == 200, r.read()
            events = sse_events(r.iter_lines())
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
        return "".join(e["choices"][0]["text"] for e in events[:-1])

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        texts = list(pool.map(one, prompts))
    assert texts == [e.text for e in expected]


def test_disconnect_after_three_chunks_frees_pages(node: NodeProcess, http: httpx.Client) -> None:
    idle = http.get("/server_info").json()["pages"]
    assert idle["free"] == idle["total"]
    body = {"model": "demo", "prompt": "every page", "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{node.url}/v1/completions", json=body, headers=HDRS, timeout=60) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen == 3:
                break
    def back_to_idle() -> bool:
        info = http.get("/server_info").json()
        return info["pages"]["free"] == idle["free"] and info["stats"]["num_running"] == 0
    wait_until(back_to_idle, 30, "pages free again after the client left")


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
def test_a_client_leaving_a_non_streamed_request_aborts_it(node: NodeProcess, http: httpx.Client, http2: bool) -> None:
    """Without a stream there is no next chunk to fail on: the node notices the hang-up itself."""
    idle = http.get("/server_info").json()["pages"]
    body = {"model": "demo", "prompt": "the prompt", "max_tokens": 1900, "ignore_eos": True}
    client = httpx.Client(base_url=node.url, headers=HDRS, http1=not http2, http2=http2, timeout=1.5)
    with client as gone, pytest.raises(httpx.ReadTimeout):  # the client gives up long before 1900 tokens
        gone.post("/v1/completions", json=body)

    def back_to_idle() -> bool:
        info = http.get("/server_info").json()
        return info["pages"]["free"] == idle["free"] and info["stats"]["num_running"] == 0 and info["in_flight"] == 0
    wait_until(back_to_idle, 5, "request aborted and pages freed after the client left")


# ---- sidecar ---------------------------------------------------------------------------------------
def test_metrics_server_info_flush_and_profile(node: NodeProcess, http: httpx.Client, tmp_path: Path) -> None:
    metrics = httpx.get(f"{node.url}/metrics", timeout=30).text  # open without the key
    for name in ("pd_node_requests_total", "pd_node_time_to_first_token_seconds_bucket",
                 "pd_node_inter_token_latency_seconds_bucket", "pd_node_e2e_request_latency_seconds_bucket",
                 "pd_node_num_requests_running", "pd_node_num_requests_waiting", "pd_node_kv_pages_used",
                 "pd_node_prefix_cache_hit_rate"):
        assert name in metrics
    info = http.get("/server_info").json()
    assert info["layout"]["page_size"] == 16 and info["max_model_len"] == 2048
    assert info["pages"]["total"] == MAX_TOTAL_TOKENS // 16 and KEY not in str(info)
    assert http.post("/flush_cache").json()["freed_pages"] >= 0
    assert http.get("/server_info").json()["pages"]["cached"] == 0
    out = tmp_path / "profiles"
    assert http.post("/start_profile", json={"output_dir": str(out)}).status_code == 200
    _assert_error(http.post("/start_profile", json={"output_dir": str(out)}), 400, "output_dir")
    _post(http, "/v1/completions", {"model": "demo", "prompt": "x", "max_tokens": 2})
    trace = http.post("/stop_profile").json()["trace"]
    assert Path(trace).is_file() and Path(trace).parent == out


# ---- errors: one test each -------------------------------------------------------------------------
CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}


def test_error_negative_max_tokens(http: httpx.Client) -> None:
    _assert_error(_post(http, "/v1/chat/completions", {**CHAT, "max_tokens": -1}), 400, "max_tokens")


def test_error_negative_max_completion_tokens(http: httpx.Client) -> None:
    _assert_error(_post(http, "/v1/chat/completions", {**CHAT, "max_completion_tokens": 0}), 400, "max_completion_tokens")


def test_error_negative_temperature(http: httpx.Client) -> None:
    _assert_error(_post(http, "/v1/chat/completions", {**CHAT, "temperature": -0.5}), 400, "temperature")


@pytest.mark.parametrize("top_p", [0.0, 1.5])
def test_error_top_p_outside_range(http: httpx.Client, top_p: float) -> None:
    _assert_error(_post(http, "/v1/completions", {"model": "demo", "prompt": "x", "top_p": top_p}), 400, "top_p")


def test_error_empty_messages(http: httpx.Client) -> None:
    _assert_error(_post(http, "/v1/chat/completions", {"model": "demo", "messages": []}), 400, "messages")


def test_error_unknown_model(http: httpx.Client) -> None:
    err = _assert_error(_post(http, "/v1/chat/completions", {**CHAT, "model": "gpt-9"}), 400, "model")
    assert err["code"] == "model_not_found"


def test_error_prompt_plus_max_tokens_beyond_context(http: httpx.Client) -> None:
    err = _assert_error(_post(http, "/v1/chat/completions", {**CHAT, "max_tokens": 2048}), 400, "max_tokens")
    assert "2048" in err["message"] and "--max-model-len" in err["message"]


def test_error_prompt_alone_beyond_context(http: httpx.Client) -> None:
    _assert_error(_post(http, "/v1/completions", {"model": "demo", "prompt": [5] * 2048}), 400, "prompt")


def test_error_wrong_type(http: httpx.Client) -> None:
    _assert_error(_post(http, "/v1/chat/completions", {**CHAT, "n": "many"}), 400, "n")


def test_error_invalid_json(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()


def test_error_pd_on_colocated_node(http: httpx.Client) -> None:
    pd = {"room": 12345, "prefill": "p0", "decode": "d0"}
    _assert_error(_post(http, "/v1/chat/completions", {**CHAT, "pd": pd}), 400, "pd")


def test_unknown_fields_ignored_but_logit_bias_refused(http: httpx.Client) -> None:
    ok = _post(http, "/v1/chat/completions", {**CHAT, "max_tokens": 2, "user": "u1", "some_new_field": 1, "logit_bias": {}})
    assert ok.status_code == 200, ok.text
    _assert_error(_post(http, "/v1/chat/completions", {**CHAT, "logit_bias": {"5": 1.0}}), 400, "logit_bias")


def test_error_missing_api_key(node: NodeProcess) -> None:
    r = httpx.post(f"{node.url}/v1/chat/completions", json=CHAT, timeout=30)
    _assert_error(r, 401, None)
    assert httpx.get(f"{node.url}/health", timeout=30).status_code == 200  # probes need no key


def test_error_wrong_api_key(node: NodeProcess, client: openai.OpenAI) -> None:
    r = httpx.post(f"{node.url}/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer nope"}, timeout=30)
    _assert_error(r, 401, None)
    wrong = client.with_options(api_key="nope")
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="demo", messages=[{"role": "user", "content": "x"}])


def test_error_body_too_large(http: httpx.Client) -> None:
    r = _post(http, "/v1/completions", {"model": "demo", "prompt": "x" * (MAX_BYTES + 10)})
    _assert_error(r, 413, None)


def test_error_queue_full_503(node: NodeProcess, http: httpx.Client) -> None:
    """Fill the node with long requests (n fills the slots), then one more is refused with Retry-After."""
    body = {"model": "demo", "prompt": "the room", "max_tokens": 1000, "ignore_eos": True, "stream": True, "n": 64}
    with httpx.stream("POST", f"{node.url}/v1/completions", json=body, headers=HDRS, timeout=60) as held:
        assert held.status_code == 200
        lines = held.iter_lines()  # kept: a dropped iterator would close the connection
        assert next(lines).startswith("data: {\"id\"")  # the body has started: its slots are taken
        info = http.get("/server_info").json()
        assert info["in_flight"] == info["admission_limit"] == RUNNING + QUEUED, info
        r = _post(http, "/v1/completions", {"model": "demo", "prompt": "x", "max_tokens": 1})
        err = _assert_error(r, 503, None)
        assert r.headers["retry-after"] and err["code"] == "queue_full"
    wait_until(lambda: http.get("/server_info").json()["in_flight"] == 0, 30, "slots released after the disconnect")


def test_engine_kill_turns_health_503(node: NodeProcess, http: httpx.Client) -> None:
    """Last in the module: it kills the engine."""
    pid = http.get("/server_info").json()["engine_pid"]
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: httpx.get(f"{node.url}/health", timeout=5).status_code == 503, 10, "/health 503 after kill -9")
    r = _post(http, "/v1/completions", {"model": "demo", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 503 and "error" in r.json()
