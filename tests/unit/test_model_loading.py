"""Loading errors name what is wrong: architecture, missing or misshapen weights, dtype, device."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pd_serve.config import ConfigError, EngineConfig
from pd_serve.model.config import ModelConfigError, load_model_config
from pd_serve.model.loader import load_model


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_unsupported_architecture_is_named(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    d = _copy(tiny_models["llama"], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelConfigError, match="GPT2LMHeadModel.*not supported"):
        load_model_config(d)


def test_missing_config_says_what_model_must_be(tmp_path: Path) -> None:
    with pytest.raises(ModelConfigError, match="no config.json"):
        load_model_config(tmp_path)


def _rewrite_weights(d: Path, change) -> None:  # noqa: ANN001
    path = d / "model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


def test_missing_weight_is_named(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    d = _copy(tiny_models["qwen2"], tmp_path / "m")
    _rewrite_weights(d, lambda t: t.pop("model.layers.1.self_attn.v_proj.weight"))
    with pytest.raises(ModelConfigError, match=r"layers\.1\.self_attn\.qkv_proj\.weight"):
        load_model(d, show_progress=False)


def test_shape_mismatch_is_named(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    d = _copy(tiny_models["mistral"], tmp_path / "m")
    _rewrite_weights(d, lambda t: t.__setitem__("model.layers.0.mlp.down_proj.weight", torch.zeros(3, 3)))
    with pytest.raises(ModelConfigError, match=r"model\.layers\.0\.mlp\.down_proj\.weight.*\(3, 3\)"):
        load_model(d, show_progress=False)


def test_bad_dtype_and_device_name_the_flag(tiny_models: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="--dtype"):
        EngineConfig(dtype="int8")
    with pytest.raises(ConfigError, match="--device"):
        EngineConfig(device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelConfigError, match="CUDA is not available"):
            load_model(tiny_models["llama"], device="cuda", show_progress=False)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_loads_and_generates(dtype: str, tiny_models: dict[str, Path]) -> None:
    from pd_serve import LLM, SamplingParams

    llm = LLM(model=str(tiny_models["llama"]), dtype=dtype, show_progress=False, max_total_tokens=512)
    assert llm.engine.kv.k_pools[0].dtype == getattr(torch, dtype)
    out = llm.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 5
