"""Our view of a Hugging Face `config.json`: the fields the Llama-family model code needs.

Supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM (qkv bias), Qwen3ForCausalLM
(q/k RMSNorm, explicit head_dim). Anything else is refused with the architecture named.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)


class ModelConfigError(ValueError):
    """The model directory or its config cannot be served; the message names what and where."""


@dataclass(frozen=True)
class RopeScaling:
    """llama3-style frequency scaling (the only rope scaling we implement)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v projections carry a bias (Qwen2)
    qk_norm: bool  # per-head RMSNorm on q and k before rope (Qwen3)
    torch_dtype: str
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    sliding_window: int | None
    config_hash: str  # sha256 of the canonical config.json, first 16 hex digits

    @property
    def attention_scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_model_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ModelConfigError(f"{path}: no config.json; --model must be a Hugging Face model directory")
    raw = json.loads(path.read_text())
    return model_config_from_dict(raw, source=str(path))


def model_config_from_dict(raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
    archs = raw.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelConfigError(
            f"{source}: architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    hidden = _get(raw, "hidden_size", source)
    heads = _get(raw, "num_attention_heads", source)
    kv_heads = raw.get("num_key_value_heads") or heads
    head_dim = raw.get("head_dim") or hidden // heads
    if heads % kv_heads:
        raise ModelConfigError(f"{source}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    sliding = raw.get("sliding_window")
    if arch == "Qwen2ForCausalLM" and not raw.get("use_sliding_window", False):
        sliding = None
    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    canonical = json.dumps(raw, sort_keys=True, separators=(",", ":")).encode()
    return ModelConfig(
        architecture=arch,
        vocab_size=_get(raw, "vocab_size", source),
        hidden_size=hidden,
        intermediate_size=_get(raw, "intermediate_size", source),
        num_layers=_get(raw, "num_hidden_layers", source),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=float(_rope_params(raw).get("rope_theta", raw.get("rope_theta", 10000.0))),
        rope_scaling=_rope_scaling(raw, source),
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=arch == "Qwen2ForCausalLM" or bool(raw.get("attention_bias", False)),
        qk_norm=arch == "Qwen3ForCausalLM",
        torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=eos_ids,
        sliding_window=int(sliding) if sliding else None,
        config_hash=hashlib.sha256(canonical).hexdigest()[:16],
    )


def _get(raw: dict[str, Any], key: str, source: str) -> Any:
    if key not in raw:
        raise ModelConfigError(f"{source}: missing required field {key!r}")
    return raw[key]


def _rope_params(raw: dict[str, Any]) -> dict[str, Any]:
    """Rope settings: `rope_parameters` (transformers >= 5) or the older `rope_scaling`."""
    return raw.get("rope_parameters") or raw.get("rope_scaling") or {}


def _rope_scaling(raw: dict[str, Any], source: str) -> RopeScaling | None:
    rs = _rope_params(raw)
    if not rs:
        return None
    kind = rs.get("rope_type") or rs.get("type") or "default"
    if kind == "default":
        return None
    if kind != "llama3":
        raise ModelConfigError(f"{source}: rope_scaling type {kind!r} is not supported (only 'llama3')")
    return RopeScaling(
        factor=float(rs["factor"]),
        low_freq_factor=float(rs["low_freq_factor"]),
        high_freq_factor=float(rs["high_freq_factor"]),
        original_max_position_embeddings=int(rs["original_max_position_embeddings"]),
    )
