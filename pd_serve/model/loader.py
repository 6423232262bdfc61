"""Load a Hugging Face Llama-family checkpoint (safetensors) into our model.

Checkpoint names map onto our parameters; q/k/v and gate/up are written into slices of the fused
projections. Every parameter must be filled exactly: a missing weight, an unexpected one or a shape
mismatch is an error naming the tensor and the file.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from pd_serve.model.config import ModelConfig, ModelConfigError, load_model_config
from pd_serve.model.llama import LlamaForCausalLM, rope_cos_sin

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def resolve_dtype(name: str, config: ModelConfig, device: str) -> torch.dtype:
    if name == "auto":
        if device == "cpu":
            return torch.float32
        name = config.torch_dtype if config.torch_dtype in _DTYPES else "bfloat16"
    if name not in _DTYPES:
        raise ModelConfigError(f"--dtype {name!r} is not one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def check_device(device: str) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelConfigError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ModelConfigError(f"--device {device}: only cpu and cuda are supported")
    return dev


def load_model(
    model_dir: str | Path,
    dtype: str = "auto",
    device: str = "cpu",
    max_positions: int | None = None,
    show_progress: bool = True,
) -> LlamaForCausalLM:
    config = load_model_config(model_dir)
    dev = check_device(device)
    torch_dtype = resolve_dtype(dtype, config, device)
    positions = max_positions or config.max_position_embeddings
    with torch.device("meta"), _without_init():
        model = LlamaForCausalLM(config, positions)
    model = model.to_empty(device=dev).to(torch_dtype)
    model.cos_sin = rope_cos_sin(config, positions).to(dev)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    _load_weights(model, Path(model_dir), show_progress)
    return model.eval()


def weights_bytes(model: torch.nn.Module) -> int:
    """Bytes the model's parameters and buffers hold (a tied embedding counted once)."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


@contextlib.contextmanager
def _without_init() -> Iterator[None]:
    """Modules built on the meta device skip their random init: every weight is loaded over it, and on
    meta tensors that init runs Python kernels that import torch._dynamo (2 s of every engine's start)."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "trunc_normal_")
    saved = {name: getattr(torch.nn.init, name) for name in names}
    for name in names:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def _checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelConfigError(f"{model_dir}: no *.safetensors files (pytorch .bin checkpoints are not supported)")
    return files


def _target(model: LlamaForCausalLM, name: str) -> tuple[str, int, int] | None:
    """Checkpoint name -> (our parameter name, row offset, row count), or None to skip."""
    c = model.config
    q, kv, inter = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size
    if name.endswith("rotary_emb.inv_freq"):
        return None
    if name == "lm_head.weight":
        return None if c.tie_word_embeddings else ("lm_head.weight", 0, c.vocab_size)
    if name.startswith("model.") and not name.startswith("model.layers."):
        return name[len("model.") :], 0, -1
    m = _LAYER_RE.match(name)
    if m is None:
        raise ModelConfigError(f"unexpected weight {name!r}")
    layer, rest = m.group(1), m.group(2)
    fused = {
        "self_attn.q_proj": ("self_attn.qkv_proj", 0, q),
        "self_attn.k_proj": ("self_attn.qkv_proj", q, kv),
        "self_attn.v_proj": ("self_attn.qkv_proj", q + kv, kv),
        "mlp.gate_proj": ("mlp.gate_up_proj", 0, inter),
        "mlp.up_proj": ("mlp.gate_up_proj", inter, inter),
    }
    module, _, kind = rest.rpartition(".")
    if module in fused:
        ours, start, rows = fused[module]
        return f"layers.{layer}.{ours}.{kind}", start, rows
    return f"layers.{layer}.{rest}", 0, -1


def _load_weights(model: LlamaForCausalLM, model_dir: Path, show_progress: bool) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    filled: dict[str, int] = {}
    files = _checkpoint_files(model_dir)
    total = 0
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            total += len(f.keys())
    with tqdm(total=total, desc="Loading weights", unit="tensor", disable=not show_progress) as bar:
        for path in files:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    target = _target(model, name)
                    bar.update(1)
                    if target is None:
                        continue
                    ours, start, rows = target
                    if ours not in params:
                        raise ModelConfigError(f"{path.name}: weight {name!r} has no place in {model.config.architecture}")
                    tensor = f.get_tensor(name)
                    _copy_into(params[ours], tensor, start, rows, name, path.name)
                    filled[ours] = filled.get(ours, 0) + tensor.shape[0]
    for ours, param in params.items():
        if ours == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        if filled.get(ours, 0) != param.shape[0]:
            raise ModelConfigError(f"{model_dir}: missing weight for {ours!r} (filled {filled.get(ours, 0)} of {param.shape[0]} rows)")


def _copy_into(param: torch.Tensor, tensor: torch.Tensor, start: int, rows: int, name: str, file: str) -> None:
    dest = param.data if rows < 0 else param.data[start : start + rows]
    if tuple(dest.shape) != tuple(tensor.shape):
        raise ModelConfigError(f"{file}: weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}")
    dest.copy_(tensor.to(dest.dtype))
