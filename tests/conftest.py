"""Shared fixtures: small random-weight Hugging Face models built with transformers, per architecture.

Weights are drawn with a wider init than usual so that greedy decoding has clear winners: the
parity tests compare argmax choices, and near-ties would make them test float noise.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ARCHS = ("llama", "mistral", "qwen2", "qwen3")


def build_tiny_model(arch: str, out: Path, tokenizer_dir: Path, **overrides: object) -> Path:
    import torch
    import transformers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    common: dict[str, object] = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=None,
    )
    kind: dict[str, tuple[str, str, dict[str, object]]] = {
        # tied embeddings and llama3 rope scaling
        "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
            tie_word_embeddings=True,
            rope_parameters=dict(rope_type="llama3", rope_theta=50000.0, factor=8.0, low_freq_factor=1.0,
                                 high_freq_factor=4.0, original_max_position_embeddings=64),
        )),
        "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None, tie_word_embeddings=False)),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False)),
        # head_dim (32) != hidden / heads (16)
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32, tie_word_embeddings=False)),
    }
    config_cls, model_cls, extra = kind[arch]
    config = getattr(transformers, config_cls)(**{**common, **extra, **overrides})
    torch.manual_seed(1234)
    model = getattr(transformers, model_cls)(config)
    if arch == "qwen2":  # transformers initialises biases to zero; make them count
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.2)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    from pd_serve.model.demo import ensure_demo_model

    return ensure_demo_model()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory, demo_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {a: build_tiny_model(a, root / a, demo_dir) for a in ARCHS}


@pytest.fixture(scope="session", autouse=True)
def _cleanup_profiles() -> None:
    yield
    shutil.rmtree("/tmp/pd-serve-test-profiles", ignore_errors=True)
