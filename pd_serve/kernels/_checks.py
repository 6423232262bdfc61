"""Argument checks shared by the Triton wrappers: shapes, dtypes, devices and strides.

Every check raises ValueError naming the argument, what it got and what it needed, before any
kernel launches. This module is plain torch: it must never import triton, so that the package
imports where triton is missing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_dim(name: str, t: torch.Tensor, dims: int, layout: str) -> None:
    if t.dim() != dims:
        raise ValueError(f"{name}: expected {dims} dims {layout}, got shape {tuple(t.shape)}")


def check_size(name: str, t: torch.Tensor, dim: int, expected: int, what: str) -> None:
    if t.shape[dim] != expected:
        raise ValueError(f"{name}: dim {dim} is {t.shape[dim]}, expected {expected} ({what})")


def check_dtype(name: str, t: torch.Tensor, allowed: Sequence[torch.dtype]) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d) for d in allowed)
        raise ValueError(f"{name}: dtype {t.dtype} is not supported; use one of {names}")


def check_same_dtype(name: str, t: torch.Tensor, other_name: str, other: torch.Tensor) -> None:
    if t.dtype != other.dtype:
        raise ValueError(f"{name}: dtype {t.dtype} differs from {other_name}'s {other.dtype}")


def check_last_contiguous(name: str, t: torch.Tensor) -> None:
    """The kernels address rows by strides but read each row's last dim as one vector."""
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: last dim must have stride 1, got strides {t.stride()}; pass .contiguous()")


def check_contiguous(name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{name}: must be contiguous, got strides {t.stride()}; pass .contiguous()")


def check_devices(tensors: dict[str, torch.Tensor], interpreted: bool) -> None:
    """All on one device; CUDA unless the kernels were built for TRITON_INTERPRET=1."""
    first_name, first = next(iter(tensors.items()))
    for name, t in tensors.items():
        if t.device != first.device:
            raise ValueError(f"{name}: on {t.device}, but {first_name} is on {first.device}")
    if first.device.type != "cuda" and not interpreted:
        raise ValueError(
            f"{first_name}: on {first.device}; the Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 "
            "set before pd_serve.kernels' Triton modules are first imported (CPU interpreter). "
            "Use the torch backend (PD_SERVE_KERNELS=torch) for CPU tensors."
        )


def check_paged_kv(
    k_pool: torch.Tensor,  # [num_pages, page_size, kv_heads, head_dim]
    v_pool: torch.Tensor,  # [num_pages, page_size, kv_heads, head_dim]
) -> None:
    check_dim("k_pool", k_pool, 4, "[num_pages, page_size, kv_heads, head_dim]")
    if v_pool.shape != k_pool.shape:
        raise ValueError(f"v_pool: shape {tuple(v_pool.shape)} differs from k_pool's {tuple(k_pool.shape)}")
    if v_pool.stride() != k_pool.stride():
        raise ValueError(f"v_pool: strides {v_pool.stride()} differ from k_pool's {k_pool.stride()}")
    check_dtype("k_pool", k_pool, FLOAT_DTYPES)
    check_same_dtype("v_pool", v_pool, "k_pool", k_pool)
    check_last_contiguous("k_pool", k_pool)


def check_attention_query(
    q: torch.Tensor,  # [rows, num_heads, head_dim]
    k_pool: torch.Tensor,  # [num_pages, page_size, kv_heads, head_dim]
    page_table: torch.Tensor,  # [batch, max_pages]
) -> None:
    check_dim("q", q, 3, "[rows, num_heads, head_dim]")
    check_size("q", q, 2, k_pool.shape[3], "head_dim of k_pool")
    if q.shape[1] % k_pool.shape[2] != 0:
        raise ValueError(
            f"q: num_heads {q.shape[1]} is not a multiple of k_pool's kv_heads {k_pool.shape[2]}"
        )
    check_same_dtype("q", q, "k_pool", k_pool)
    check_last_contiguous("q", q)
    check_dim("page_table", page_table, 2, "[batch, max_pages]")
    check_dtype("page_table", page_table, INDEX_DTYPES)
    check_last_contiguous("page_table", page_table)


def check_vector(name: str, t: torch.Tensor, length: int, what: str) -> None:
    check_dim(name, t, 1, f"[{what}]")
    check_size(name, t, 0, length, what)
    check_dtype(name, t, INDEX_DTYPES)
    check_contiguous(name, t)
