"""The engine's entry points to the kernels: one function per op, Triton or torch reference.

Each function has the signature of its reference in `reference.py`. Which implementation runs:
- backend "auto" (default): the Triton kernel for CUDA tensors when triton imports, else the reference;
- backend "torch": always the reference;
- backend "triton": always the Triton kernel. On CPU tensors that means Triton's interpreter: the
  first Triton call on a CPU tensor sets TRITON_INTERPRET=1 for the process (and its children)
  unless a Triton module was already loaded for CUDA, in which case the wrapper's device check says so.
The backend comes from the environment variable PD_SERVE_KERNELS (auto|torch|triton) and can be
changed with `set_backend()` or, scoped, with `use_backend()`. The Triton modules are imported on
first use, so importing this module never needs triton.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import torch

from pd_serve.kernels import reference

BACKENDS = ("auto", "torch", "triton")
_TRITON_MODULES = tuple(
    f"pd_serve.kernels.{m}" for m in ("triton_kv", "triton_decode", "triton_extend", "triton_norm")
)
ENV_VAR = "PD_SERVE_KERNELS"


def _validated(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}: unknown kernel backend {name!r}; use one of {', '.join(BACKENDS)}")
    return name


class _Selection:
    """The process-wide backend choice; its only writers are set_backend and use_backend."""

    def __init__(self) -> None:
        self.name = _validated(os.environ.get(ENV_VAR, "auto"), f"environment variable {ENV_VAR}")


_selection = _Selection()


def get_backend() -> str:
    return _selection.name


def set_backend(name: str) -> None:
    """Force "torch" or "triton" for every later call, or go back to "auto"."""
    _selection.name = _validated(name, "set_backend")


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run a block with the given backend, then restore the previous one (for tests)."""
    previous = _selection.name
    set_backend(name)
    try:
        yield
    finally:
        _selection.name = previous


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"pd_serve.kernels.{name}")


def _pick(
    reference_fn: Callable[..., Any], module: str, name: str, probe: torch.Tensor
) -> Callable[..., Any]:
    backend = _selection.name
    if backend == "torch" or (backend == "auto" and not (probe.is_cuda and triton_available())):
        return reference_fn
    if not triton_available():
        raise RuntimeError(
            f"kernel backend 'triton' was forced ({ENV_VAR} or set_backend) but triton is not installed"
        )
    if not probe.is_cuda and not any(m in sys.modules for m in _TRITON_MODULES):
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated, at their import
    fn: Callable[..., Any] = getattr(_module(module), name)
    return fn


def store_kv(
    k_pool: torch.Tensor,  # [num_pages, page_size, kv_heads, head_dim]
    v_pool: torch.Tensor,  # [num_pages, page_size, kv_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64, page_id * page_size + offset
) -> None:
    _pick(reference.store_kv_ref, "triton_kv", "store_kv_triton", k_pool)(k_pool, v_pool, k, v, slot_mapping)


def paged_decode_attention(
    q: torch.Tensor,  # [batch, num_heads, head_dim], one query token per sequence
    k_pool: torch.Tensor,  # [num_pages, page_size, kv_heads, head_dim]
    v_pool: torch.Tensor,  # [num_pages, page_size, kv_heads, head_dim]
    page_table: torch.Tensor,  # [batch, max_pages] int32
    context_lens: torch.Tensor,  # [batch] int32, tokens in context including the query token
    scale: float,
) -> torch.Tensor:  # [batch, num_heads, head_dim], dtype of q
    fn = _pick(reference.paged_decode_attention_ref, "triton_decode", "paged_decode_attention_triton", q)
    out: torch.Tensor = fn(q, k_pool, v_pool, page_table, context_lens, scale)
    return out


def extend_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim], sequences back to back
    k_pool: torch.Tensor,  # [num_pages, page_size, kv_heads, head_dim]
    v_pool: torch.Tensor,  # [num_pages, page_size, kv_heads, head_dim]
    page_table: torch.Tensor,  # [batch, max_pages] int32
    query_start: torch.Tensor,  # [batch + 1] int32, offsets of each sequence's tokens in q
    context_lens: torch.Tensor,  # [batch] int32, cached prefix + new tokens
    scale: float,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    fn = _pick(reference.extend_attention_ref, "triton_extend", "extend_attention_triton", q)
    out: torch.Tensor = fn(q, k_pool, v_pool, page_table, query_start, context_lens, scale)
    return out


def rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,  # [num_tokens, hidden]; added to x first when given
) -> tuple[torch.Tensor, torch.Tensor]:
    fn = _pick(reference.rms_norm_ref, "triton_norm", "rms_norm_triton", x)
    normed, new_residual = fn(x, weight, eps, residual)
    return normed, new_residual


def rotary(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim], rotated in place
    k: torch.Tensor,  # [num_tokens, kv_heads, head_dim], rotated in place
    positions: torch.Tensor,  # [num_tokens] int64
    cos_sin: torch.Tensor,  # [max_positions, head_dim] float32: cos in the first half, sin in the second
) -> None:
    _pick(reference.rotary_ref, "triton_norm", "rotary_triton", q)(q, k, positions, cos_sin)


def gather_pages(
    pools: list[torch.Tensor],  # each [num_pages, page_size, kv_heads, head_dim]
    page_ids: torch.Tensor,  # [n] int64
    out: torch.Tensor,  # [len(pools), n, page_size, kv_heads, head_dim]
) -> None:
    _pick(reference.gather_pages_ref, "triton_kv", "gather_pages_triton", out)(pools, page_ids, out)


def scatter_pages(
    staging: torch.Tensor,  # [len(pools), n, page_size, kv_heads, head_dim]
    pools: list[torch.Tensor],  # each [num_pages, page_size, kv_heads, head_dim]
    page_ids: torch.Tensor,  # [n] int64
) -> None:
    _pick(reference.scatter_pages_ref, "triton_kv", "scatter_pages_triton", staging)(staging, pools, page_ids)
