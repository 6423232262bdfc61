"""GGUF files (written here, gguf_builder.py) through our loader against transformers loading the same file.

Per type and architecture: the converted weights equal what the file holds (q/k un-permuted for
llama), and greedy generation is token for token transformers' (`from_pretrained(dir, gguf_file=...)`)
in float32. The tokenizer we build from the metadata encodes, renders chats and decodes as
transformers' does, for byte-level BPE and for sentencepiece-style vocabularies. Bad files, and the
conversion cache, are in test_gguf_cache.py.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf_builder import CHATML, TinySpec, write_gguf, write_spm_gguf

from pd_serve import LLM, SamplingParams
from pd_serve.model.gguf_file import open_gguf
from pd_serve.model.gguf_tokenizer import build_tokenizer, read_vocab
from pd_serve.model.source import resolve_model_path

CASES = {
    "f32": TinySpec(qtype="F32"),
    "f16": TinySpec(qtype="F16", seed=1),
    "q8_0": TinySpec(qtype="Q8_0", seed=2),
    "q4_0": TinySpec(qtype="Q4_0", seed=3),
    "q4_1": TinySpec(qtype="Q4_1", seed=4, tied=False),
    # the k-quants and bf16, in one model wide enough for their 256-value blocks
    "kquants_bf16": TinySpec(
        qtype="Q4_K",
        hidden=256,
        intermediate=256,
        heads=8,
        kv_heads=2,
        seed=5,
        types={
            "token_embd": "BF16",
            "attn_k": "Q5_K",
            "attn_v": "Q6_K",
            "attn_output": "Q2_K",
            "ffn_gate": "Q3_K",
        },
    ),  # fmt: skip
    "qwen2_f16": TinySpec(arch="qwen2", qtype="F16", tied=False, seed=6),
    # head_dim 128 (!= hidden / heads): transformers reads no key_length for qwen3 and assumes 128
    "qwen3_q8_0": TinySpec(arch="qwen3", qtype="Q8_0", head_dim=128, seed=7),
}
PROMPT_LENS = (4, 19, 45)
MAX_TOKENS = 8
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
TEXTS = [
    "the scheduler moves pages",
    "hello, world! 12345",
    "<|im_start|>user\nhi<|im_end|>\n",
    "  two  spaces\n\nend",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("gguf-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PD_SERVE_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, np.ndarray]]]:
    """case -> (its GGUF file, alone in its directory as transformers wants; the weights it holds)."""
    out = {}
    for name, spec in CASES.items():
        path = tmp_path_factory.mktemp(name) / f"tiny-{name}.gguf"
        out[name] = (path, write_gguf(path, spec))
    return out


def transformers_greedy(path: Path, prompts: list[list[int]]) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    hf.generation_config.eos_token_id = None
    outs = []
    with torch.no_grad():
        for p in prompts:
            x = torch.tensor([p])
            ids = hf.generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=MAX_TOKENS, do_sample=False
            )
            outs.append(ids[0, len(p) :].tolist())
    return outs


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_matches_transformers(case: str, files, cache: Path) -> None:
    path, _ = files[case]
    gen = torch.Generator().manual_seed(len(case))
    vocab = len(read_vocab(open_gguf(path)).tokens)
    prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENS]
    llm = LLM(model=str(path), dtype="float32", max_total_tokens=1024, show_progress=False)
    ours = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    assert ours == transformers_greedy(path, prompts)


@pytest.mark.parametrize("case", ["f32", "q4_1", "kquants_bf16", "qwen3_q8_0"])
def test_converted_weights_are_what_the_file_holds(case: str, files, cache: Path) -> None:
    """Exact in float32: dequantization, layout, and the q/k rows of llama put back in Hugging Face order."""
    from safetensors.torch import load_file

    path, held = files[case]
    converted = load_file(str(resolve_model_path(str(path), "float32") / "model.safetensors"))
    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "ffn_down": "mlp.down_proj"}
    for gguf_name, hf_name in names.items():
        for layer in range(CASES[case].layers):
            expected = torch.from_numpy(held[f"blk.{layer}.{gguf_name}.weight"])
            assert torch.equal(converted[f"model.layers.{layer}.{hf_name}.weight"], expected), (
                gguf_name,
                layer,
            )
    assert torch.equal(converted["model.embed_tokens.weight"], torch.from_numpy(held["token_embd.weight"]))
    assert ("lm_head.weight" in converted) == (not CASES[case].tied)


def test_bfloat16_conversion_is_a_cache_entry_of_its_own(files, cache: Path) -> None:
    path, held = files["f16"]
    bf16 = resolve_model_path(str(path), "bfloat16")
    assert bf16 != resolve_model_path(str(path), "float32") and bf16.name.endswith("-bfloat16")
    llm = LLM(model=str(path), dtype="bfloat16", max_total_tokens=256, show_progress=False)
    assert llm.engine.model.embed_tokens.weight.dtype == torch.bfloat16
    assert len(llm.generate([[1, 2, 3]], GREEDY)[0].token_ids) == MAX_TOKENS


def test_tokenizer_matches_transformers(files, cache: Path) -> None:
    from transformers import AutoTokenizer

    path, _ = files["f32"]
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ours = AutoTokenizer.from_pretrained(str(resolve_model_path(str(path), "float32")))
    for text in TEXTS:
        assert ours.encode(text) == ref.encode(text), text
        assert ours.decode(ours.encode(text)) == text
    assert ours.chat_template == CHATML
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    rendered = ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rendered == ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert ours.encode("<|im_end|>", add_special_tokens=False) == [2]  # a control token stays whole
    assert (ours.eos_token, ours.bos_token) == ("<|im_end|>", "<|im_start|>")


def test_engine_stops_at_the_gguf_eos(files, cache: Path) -> None:
    path, _ = files["f32"]
    llm = LLM(model=str(path), dtype="float32", max_total_tokens=256, show_progress=False)
    assert llm.engine.eos_ids == frozenset({2})  # tokenizer.ggml.eos_token_id: <|im_end|>


def test_digits_split_as_llama_cpp_splits_them_for_smollm(files) -> None:
    """tokenizer.ggml.pre = smollm: every digit alone before the merges (llama.cpp's regex for it)."""
    path, _ = files["f32"]
    vocab = read_vocab(open_gguf(path))
    default = build_tokenizer(vocab).encode("year 2024").tokens
    smollm = build_tokenizer(dataclasses.replace(vocab, pre="smollm")).encode("year 2024").tokens
    assert smollm[-4:] == ["2", "0", "2", "4"] and len(default) < len(smollm)


def test_sentencepiece_tokenizer_matches_transformers(tmp_path: Path, cache: Path) -> None:
    """tokenizer.ggml.model = llama, with scores and no merges: merges derived, byte fallback, BOS added."""
    from transformers import AutoTokenizer

    path = tmp_path / "spm.gguf"
    write_spm_gguf(path)
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    ours = AutoTokenizer.from_pretrained(str(resolve_model_path(str(path), "float32")))
    for text in ("the scheduler moves pages", "Hello, world!", " the  token", "the\nworld</s>"):
        ids = ours.encode(text)
        assert ids == ref.encode(text), text
        assert ids[0] == 1 and ours.decode(ids, skip_special_tokens=True) == ref.decode(
            ids, skip_special_tokens=True
        )
    assert len(ours.encode("hello world")) == 3  # <s>, ▁hello, ▁world: the merges were recovered


def test_converted_directory_needs_nothing_but_itself(files, cache: Path) -> None:
    """The cache entry is a plain Hugging Face directory: transformers loads it without the GGUF."""
    from transformers import AutoModelForCausalLM

    path, _ = files["q8_0"]
    entry = resolve_model_path(str(path), "float32")
    assert sorted(os.listdir(entry)) == [
        "config.json", "generation_config.json", "gguf_source.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json",
    ]  # fmt: skip
    hf = AutoModelForCausalLM.from_pretrained(str(entry), dtype=torch.float32)
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.tie_word_embeddings
