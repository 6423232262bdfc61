"""Greedy output and prompt logits of our engine against transformers, on the same weights (float32, CPU)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from pd_serve import LLM, SamplingParams

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "demo")
PROMPT_LENS = (3, 17, 40, 64, 5, 33, 90, 12)
MAX_TOKENS = 12
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="session")
def model_dirs(tiny_models: dict[str, Path], demo_dir: Path) -> dict[str, Path]:
    return {**tiny_models, "demo": demo_dir}


@pytest.fixture(scope="session")
def hf_reference(model_dirs: dict[str, Path]) -> dict[str, tuple[list[list[int]], list[list[int]]]]:
    """arch -> (prompts, transformers' greedy continuations), each prompt generated alone."""
    from transformers import AutoModelForCausalLM

    refs = {}
    for arch, path in model_dirs.items():
        hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        hf.generation_config.eos_token_id = None
        gen = torch.Generator().manual_seed(ARCHS.index(arch))
        vocab = hf.config.vocab_size
        prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENS]
        outs = []
        with torch.no_grad():
            for p in prompts:
                x = torch.tensor([p])  # an explicit mask: token 0 in a prompt must not read as padding
                ids = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=MAX_TOKENS, do_sample=False)
                outs.append(ids[0, len(p) :].tolist())
        refs[arch] = (prompts, outs)
    return refs


def _llm(path: Path, **options: object) -> LLM:
    # PD_SERVE_TEST_DEVICE=cuda (bench/gpu_checks.sh): the engine on a GPU, its Triton kernels compiled,
    # against the same transformers reference on CPU.
    device = os.environ.get("PD_SERVE_TEST_DEVICE", "cpu")
    return LLM(model=str(path), show_progress=False, dtype="float32", device=device, **options)


@pytest.mark.parametrize("page_size", [1, 16, 7, 32])
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_batch_matches_transformers(arch: str, page_size: int, model_dirs, hf_reference) -> None:
    prompts, expected = hf_reference[arch]
    llm = _llm(model_dirs[arch], page_size=page_size, max_total_tokens=4096)
    outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == expected
    assert all(o.finish_reason == "length" for o in outs)


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_logits_match_transformers(arch: str, model_dirs, hf_reference) -> None:
    from transformers import AutoModelForCausalLM

    prompt = hf_reference[arch][0][6]  # the longest
    hf = AutoModelForCausalLM.from_pretrained(str(model_dirs[arch]), dtype=torch.float32).eval()
    with torch.no_grad():
        expected = hf(torch.tensor([prompt])).logits[0].float()
    ours = _llm(model_dirs[arch], page_size=7, max_total_tokens=1024).engine.prompt_logits(prompt)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


def test_chunked_prefill_splits_long_prompts(model_dirs, hf_reference) -> None:
    prompts, expected = hf_reference["llama"]
    llm = _llm(model_dirs["llama"], page_size=16, chunked_prefill_size=24, max_total_tokens=4096)
    chunks: dict[str, int] = {}
    schedule = llm.engine.scheduler.schedule

    def recording_schedule():
        out = schedule()
        for c in out.chunks:
            if c.start < c.request.num_prompt_tokens:
                chunks[c.request.request_id] = chunks.get(c.request.request_id, 0) + 1
        return out

    llm.engine.scheduler.schedule = recording_schedule  # type: ignore[method-assign]
    outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == expected
    longest = outs[PROMPT_LENS.index(max(PROMPT_LENS))].request_id
    assert chunks[longest] >= 3


def test_prefix_cache_reuses_pages_for_a_repeated_prompt(model_dirs, hf_reference) -> None:
    prompts, expected = hf_reference["qwen3"]
    llm = _llm(model_dirs["qwen3"], page_size=16, max_total_tokens=4096)
    first = llm.generate([prompts[6]], GREEDY)[0]
    second = llm.generate([prompts[6]], GREEDY)[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == (len(prompts[6]) - 1) // 16 * 16 > 0
    assert first.token_ids == second.token_ids == expected[6]
    assert llm.engine.stats().prefix_cache_hit_tokens == second.num_cached_tokens


def test_preemption_with_a_tiny_pool_keeps_outputs_exact(model_dirs, hf_reference) -> None:
    prompts, expected = hf_reference["mistral"]
    # 8 pages of 16 tokens: the longest request alone needs 7, so requests must take turns
    llm = _llm(model_dirs["mistral"], page_size=16, max_total_tokens=128)
    outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == expected
    stats = llm.engine.stats()
    assert stats.num_preemptions > 0
    assert stats.num_free_pages == stats.num_total_pages


_TRITON_SCRIPT = """
import json, sys
from pd_serve import LLM, SamplingParams
model, prompts = sys.argv[1], json.loads(sys.argv[2])
llm = LLM(model=model, show_progress=False, dtype="float32", page_size=7, max_total_tokens=1024,
          attention_backend="triton")
assert llm.engine.runner.kernel_backend == "triton"
outs = llm.generate(prompts, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
print(json.dumps([o.token_ids for o in outs]))
"""


def test_triton_attention_path_matches_transformers_under_the_interpreter(model_dirs, hf_reference) -> None:
    """The GPU code path (Triton store/decode/extend kernels), run by Triton's CPU interpreter.

    In a fresh process: TRITON_INTERPRET must be set before anything imports triton.language.
    """
    import json
    import os
    import subprocess
    import sys

    prompts, expected = hf_reference["qwen3"]
    few = [0, 2, 4]  # short prompts: the interpreter is slow
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _TRITON_SCRIPT, str(model_dirs["qwen3"]), json.dumps([prompts[i] for i in few])],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [expected[i][:4] for i in few]


def test_triton_backend_on_cpu_without_the_interpreter_says_how(model_dirs, monkeypatch) -> None:
    from pd_serve.config import ConfigError

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="TRITON_INTERPRET=1"):
        _llm(model_dirs["llama"], max_total_tokens=256, attention_backend="triton")
