"""Read and validate a GGUF file: its metadata as a Hugging Face config, its tensors and their types.

Nothing here writes a file or dequantizes a weight (gguf_convert.py does both). Every refusal is a
`GGUFError` that names the file, the metadata field or tensor at fault, and what to do, so that a
conversion never starts on a file it could not finish or would get wrong.

Calls, in order:
- `open_gguf(path)` -> `GGUFFile` (a file that is not GGUF, truncated or corrupt is refused here)
- `GGUFFile.hf_config()` -> the config.json dict (architecture, sizes, rope, norms, tied embeddings)
- `GGUFFile.hf_tensors(config)` -> each tensor with its Hugging Face name, every name, shape and
  type checked against the config
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pd_serve.model.config import ModelConfigError

if TYPE_CHECKING:
    from gguf import GGUFReader, ReaderTensor

# ggml type names we dequantize (through gguf.quants); any other is refused, naming the tensor
SUPPORTED_TYPES = (
    "F32",
    "F16",
    "BF16",
    "Q8_0",
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
)
_MISSING = object()
_BLK = re.compile(r"^blk\.(\d+)\.([a-z_0-9]+)\.(weight|bias)$")
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


class GGUFError(ModelConfigError):
    """A GGUF file cannot be served; the message names the file, the field or tensor, and what to do."""


@dataclass(frozen=True)
class GGUFArch:
    """How one GGUF `general.architecture` maps onto our model."""

    hf_class: str
    model_type: str
    permute_qk: bool  # llama.cpp's converter interleaved q/k rows for its rope layout; we undo it
    qk_norm: bool  # per-head q/k RMSNorm (Qwen3)


ARCHITECTURES = {
    "llama": GGUFArch("LlamaForCausalLM", "llama", permute_qk=True, qk_norm=False),
    "mistral": GGUFArch("MistralForCausalLM", "mistral", permute_qk=True, qk_norm=False),
    "qwen2": GGUFArch("Qwen2ForCausalLM", "qwen2", permute_qk=False, qk_norm=False),
    "qwen3": GGUFArch("Qwen3ForCausalLM", "qwen3", permute_qk=False, qk_norm=True),
}


@dataclass(frozen=True)
class HFTensor:
    """One GGUF tensor and where it goes in the Hugging Face checkpoint."""

    hf_name: str
    tensor: ReaderTensor
    shape: tuple[int, ...]  # row-major (Hugging Face) shape, e.g. [out_features, in_features]


class GGUFFile:
    def __init__(self, path: Path, reader: GGUFReader) -> None:
        self.path, self.reader = path, reader

    def error(self, what: str) -> GGUFError:
        return GGUFError(f"{self.path}: {what}")

    def field(self, key: str, default: Any = _MISSING) -> Any:
        """A metadata value as Python data; without `default`, a missing key is an error naming it."""
        entry = self.reader.fields.get(key)
        if entry is None:
            if default is _MISSING:
                raise self.error(f"metadata field {key!r} is missing; the file is incomplete or not a model")
            return default
        try:
            return entry.contents()
        except (ValueError, IndexError, UnicodeDecodeError) as exc:
            raise self.error(f"metadata field {key!r} cannot be read ({exc}); the file is corrupt") from exc

    def int_field(self, key: str, default: Any = _MISSING) -> int:
        value = self.field(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self.error(f"metadata field {key!r} is {value!r}, expected one whole number >= 0")
        return value

    @property
    def arch_name(self) -> str:
        return str(self.field("general.architecture"))

    def arch(self) -> GGUFArch:
        name = self.arch_name
        if name not in ARCHITECTURES:
            raise self.error(
                f"general.architecture {name!r} is not supported; pd-serve serves {', '.join(ARCHITECTURES)} "
                "(Llama-family decoders); convert another model to safetensors and pass its directory"
            )
        return ARCHITECTURES[name]

    def hf_config(self) -> dict[str, Any]:
        arch, p = self.arch(), self.arch_name
        heads = self.int_field(f"{p}.attention.head_count")
        hidden = self.int_field(f"{p}.embedding_length")
        head_dim = self.int_field(f"{p}.attention.key_length", hidden // max(heads, 1))
        self._check_dense(p)
        self._check_rope(p, head_dim)
        names = {t.name for t in self.reader.tensors}
        config: dict[str, Any] = {
            "architectures": [arch.hf_class],
            "model_type": arch.model_type,
            "vocab_size": self._vocab_size(p),
            "hidden_size": hidden,
            "intermediate_size": self.int_field(f"{p}.feed_forward_length"),
            "num_hidden_layers": self.int_field(f"{p}.block_count"),
            "num_attention_heads": heads,
            "num_key_value_heads": self.int_field(f"{p}.attention.head_count_kv", heads),
            "head_dim": head_dim,
            "max_position_embeddings": self.int_field(f"{p}.context_length"),
            "rms_norm_eps": float(self.field(f"{p}.attention.layer_norm_rms_epsilon")),
            "rope_theta": float(self.field(f"{p}.rope.freq_base", 10000.0)),
            "tie_word_embeddings": "output.weight" not in names,
            "attention_bias": "blk.0.attn_q.bias" in names,
            "hidden_act": "silu",
        }
        window = self.field(f"{p}.attention.sliding_window", None)
        if window:
            config["sliding_window"] = int(window)
        if heads == 0 or config["num_key_value_heads"] == 0 or heads % config["num_key_value_heads"]:
            raise self.error(
                f"{p}.attention.head_count={heads} is not a positive multiple of "
                f"{p}.attention.head_count_kv={config['num_key_value_heads']}; the file is corrupt"
            )
        return config

    def _vocab_size(self, p: str) -> int:
        if f"{p}.vocab_size" in self.reader.fields:
            return self.int_field(f"{p}.vocab_size")
        embed = next((t for t in self.reader.tensors if t.name == "token_embd.weight"), None)
        if embed is None:
            raise self.error("tensor 'token_embd.weight' is missing; the file is incomplete")
        return int(embed.shape[-1])  # GGUF lists dimensions fastest first: [hidden, vocab]

    def _check_dense(self, p: str) -> None:
        experts = self.field(f"{p}.expert_count", 0)
        if experts:
            raise self.error(f"{p}.expert_count = {experts}: mixture-of-experts models are not supported")

    def _check_rope(self, p: str, head_dim: int) -> None:
        rotary = self.field(f"{p}.rope.dimension_count", head_dim)
        if rotary != head_dim:
            raise self.error(
                f"{p}.rope.dimension_count = {rotary} but the head dimension is {head_dim}: partial rotary "
                "embeddings are not supported"
            )
        scaling = self.field(f"{p}.rope.scaling.type", "none")
        if scaling not in ("none", ""):
            raise self.error(f"{p}.rope.scaling.type = {scaling!r} is not supported (only unscaled rope)")
        if any(t.name == "rope_freqs.weight" for t in self.reader.tensors):
            raise self.error(
                "tensor 'rope_freqs.weight' (llama3-style rope frequency factors) is not supported from a "
                "GGUF; "
                "serve this model from its Hugging Face directory instead"
            )

    def hf_tensors(self, config: dict[str, Any]) -> list[HFTensor]:
        """Every tensor with its Hugging Face name; an unknown name, a wrong shape, an unsupported type or
        a missing tensor is an error naming it."""
        expected = expected_shapes(config, ARCHITECTURES[self.arch_name].qk_norm)
        out = []
        for t in self.reader.tensors:
            hf_name = self._hf_name(t.name)
            if hf_name not in expected:
                raise self.error(
                    f"tensor {t.name!r} has no place in {config['architectures'][0]} "
                    f"with {config['num_hidden_layers']} layers; the file does not match its metadata"
                )
            if t.tensor_type.name not in SUPPORTED_TYPES:
                raise self.error(
                    f"tensor {t.name!r} has type {t.tensor_type.name}, which pd-serve cannot dequantize; "
                    f"supported: {', '.join(SUPPORTED_TYPES)}; use a GGUF quantized to one of these"
                )
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            if shape != expected[hf_name]:
                raise self.error(
                    f"tensor {t.name!r} has shape {shape}, expected {expected[hf_name]} from the metadata"
                )
            out.append(HFTensor(hf_name, t, shape))
        missing = set(expected) - {h.hf_name for h in out} - _optional(config)
        if missing:
            raise self.error(
                f"tensor for {sorted(missing)[0]!r} is missing ({len(missing)} missing in all); "
                "the file is incomplete"
            )
        return out

    def _hf_name(self, name: str) -> str:
        if name in _GLOBAL_TENSORS:
            return _GLOBAL_TENSORS[name]
        m = _BLK.match(name)
        if m is None or m.group(2) not in _LAYER_TENSORS:
            raise self.error(f"tensor {name!r} is not one pd-serve knows for {self.arch_name!r}")
        return f"model.layers.{m.group(1)}.{_LAYER_TENSORS[m.group(2)]}.{m.group(3)}"


def expected_shapes(config: dict[str, Any], qk_norm: bool) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor name -> shape, for every tensor the config implies (optional ones included)."""
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q, kv, hd = (
        config["num_attention_heads"] * config["head_dim"],
        config["num_key_value_heads"] * config["head_dim"],
        config["head_dim"],
    )
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    per_layer = {
        "input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (q, hidden), "self_attn.k_proj.weight": (kv, hidden),
        "self_attn.v_proj.weight": (kv, hidden), "self_attn.o_proj.weight": (hidden, q),
        "self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,),
        "mlp.gate_proj.weight": (inter, hidden), "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
    }  # fmt: skip
    if qk_norm:
        per_layer |= {"self_attn.q_norm.weight": (hd,), "self_attn.k_norm.weight": (hd,)}
    for layer in range(config["num_hidden_layers"]):
        shapes |= {f"model.layers.{layer}.{name}": shape for name, shape in per_layer.items()}
    return shapes


def _optional(config: dict[str, Any]) -> set[str]:
    """Names `expected_shapes` lists that a valid file may lack: a tied head, absent q/k/v biases."""
    names = {"lm_head.weight"} if config["tie_word_embeddings"] else set()
    if not config["attention_bias"]:
        names |= {
            f"model.layers.{i}.self_attn.{p}_proj.bias"
            for i in range(config["num_hidden_layers"])
            for p in "qkv"
        }
    return names


def open_gguf(path: str | Path) -> GGUFFile:
    """Open `path` for reading (memory-mapped); a file that is not GGUF, truncated or corrupt is refused."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise GGUFError(
            f"{path}: no such file; --model takes a .gguf file, a model directory, 'smollm2' or 'demo'"
        )
    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError, struct.error) as exc:
        raise GGUFError(
            f"{path}: not a readable GGUF file: truncated or corrupt ({exc}); download or convert it again"
        ) from exc
    return GGUFFile(path, reader)
