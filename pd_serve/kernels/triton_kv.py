"""Triton kernels that move KV rows: store_kv (new tokens into slots) and page gather/scatter.

Same signatures and semantics as `reference.store_kv_ref`, `gather_pages_ref` and
`scatter_pages_ref`. Gather and scatter reach every pool in one launch through a table of the
pools' data pointers, so the pools must share shape, strides and dtype (the engine allocates them
that way). Slot and page ids are not range-checked here (that would cost a device sync); the
caller owns them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pd_serve.kernels import _checks as c
from pd_serve.kernels._triton_util import is_interpreted, pow2, to_rtne

_PAGE_BLOCK = 1024  # elements of one page copied by one program


@triton.jit
def _store_kv_kernel(
    k_pool, v_pool, k, v, slots,
    pool_s_page, pool_s_tok, pool_s_head,
    k_s_tok, k_s_head, v_s_tok, v_s_head,
    page_size, kv_heads, head_dim,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    tok = tl.program_id(0)
    slot = tl.load(slots + tok).to(tl.int64)
    page, off = slot // page_size, slot % page_size
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < kv_heads) & (d < head_dim)
    dst = page * pool_s_page + off * pool_s_tok + h * pool_s_head + d
    kx = tl.load(k + tok * k_s_tok + h * k_s_head + d, mask=mask)
    vx = tl.load(v + tok * v_s_tok + h * v_s_head + d, mask=mask)
    tl.store(k_pool + dst, to_rtne(kx.to(tl.float32), k_pool.dtype.element_ty), mask=mask)
    tl.store(v_pool + dst, to_rtne(vx.to(tl.float32), v_pool.dtype.element_ty), mask=mask)


def store_kv_triton(
    k_pool: torch.Tensor,  # [num_pages, page_size, kv_heads, head_dim]
    v_pool: torch.Tensor,  # [num_pages, page_size, kv_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64, page_id * page_size + offset
) -> None:
    """Write each new token's K and V into its slot."""
    c.check_paged_kv(k_pool, v_pool)
    _, page_size, kv_heads, head_dim = k_pool.shape
    for name, t in (("k", k), ("v", v)):
        c.check_dim(name, t, 3, "[num_tokens, kv_heads, head_dim]")
        c.check_size(name, t, 1, kv_heads, "kv_heads of k_pool")
        c.check_size(name, t, 2, head_dim, "head_dim of k_pool")
        c.check_dtype(name, t, c.FLOAT_DTYPES)
        c.check_last_contiguous(name, t)
    c.check_size("v", v, 0, k.shape[0], "num_tokens of k")
    c.check_vector("slot_mapping", slot_mapping, k.shape[0], "num_tokens")
    tensors = {"k_pool": k_pool, "v_pool": v_pool, "k": k, "v": v, "slot_mapping": slot_mapping}
    c.check_devices(tensors, is_interpreted(_store_kv_kernel))
    if k.shape[0] == 0:
        return
    _store_kv_kernel[(k.shape[0],)](
        k_pool, v_pool, k, v, slot_mapping,
        k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        page_size, kv_heads, head_dim,
        BLOCK_H=pow2(kv_heads), BLOCK_D=pow2(head_dim),
    )  # fmt: skip


@triton.jit
def _page_copy_kernel(
    pool_ptrs, staging, page_ids,
    num_ids, page_numel, pool_s_page,
    TO_STAGING: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    """Program (pool * num_ids + i, chunk): one BLOCK of page page_ids[i] of one pool.

    The pools' addresses are loaded from memory, so the compiler knows nothing of their alignment
    and would move the pool side 2 bytes at a time. ALIGNED (every page starts on 16 bytes, checked
    by the caller) lets it use 128-bit loads and stores there.
    """
    row = tl.program_id(0)
    pool_idx, i = row // num_ids, row % num_ids
    pool = tl.load(pool_ptrs + pool_idx).to(tl.pointer_type(staging.dtype.element_ty))
    page = tl.load(page_ids + i).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < page_numel
    page_at = pool + page * pool_s_page
    if ALIGNED:
        page_at = tl.multiple_of(page_at, 16)
    pool_at = page_at + offs
    staging_at = staging + row.to(tl.int64) * page_numel + offs
    if TO_STAGING:
        tl.store(staging_at, tl.load(pool_at, mask=mask), mask=mask)
    else:
        tl.store(pool_at, tl.load(staging_at, mask=mask), mask=mask)


def _check_page_copy(
    pools: list[torch.Tensor],  # each [num_pages, page_size, kv_heads, head_dim]
    page_ids: torch.Tensor,  # [n] int64
    staging: torch.Tensor,  # [len(pools), n, page_size, kv_heads, head_dim]
    staging_name: str,
) -> None:
    if not pools:
        raise ValueError("pools: empty list; pass at least one pool")
    first = pools[0]
    c.check_dim("pools[0]", first, 4, "[num_pages, page_size, kv_heads, head_dim]")
    c.check_dtype("pools[0]", first, c.FLOAT_DTYPES)
    if not first[0].is_contiguous():
        raise ValueError(f"pools[0]: each page must be contiguous, got strides {first.stride()}")
    for i, pool in enumerate(pools[1:], start=1):
        if pool.shape != first.shape or pool.stride() != first.stride() or pool.dtype != first.dtype:
            raise ValueError(f"pools[{i}]: shape, strides and dtype must equal pools[0]'s")
    c.check_dim("page_ids", page_ids, 1, "[n]")
    c.check_vector("page_ids", page_ids, page_ids.shape[0], "n")
    expected = (len(pools), page_ids.shape[0], *first.shape[1:])
    if tuple(staging.shape) != expected:
        raise ValueError(f"{staging_name}: shape {tuple(staging.shape)}, expected {expected}")
    c.check_same_dtype(staging_name, staging, "pools[0]", first)
    c.check_contiguous(staging_name, staging)
    tensors = {f"pools[{i}]": p for i, p in enumerate(pools)}
    tensors.update({"page_ids": page_ids, staging_name: staging})
    c.check_devices(tensors, is_interpreted(_page_copy_kernel))


def _page_copy(
    pools: list[torch.Tensor],  # each [num_pages, page_size, kv_heads, head_dim]
    page_ids: torch.Tensor,  # [n] int64
    staging: torch.Tensor,  # [len(pools), n, page_size, kv_heads, head_dim]
    to_staging: bool,
    max_block: int = _PAGE_BLOCK,  # elements per program; bench_kernels.py sweeps it on a GPU
) -> None:
    n = page_ids.shape[0]
    if n == 0:
        return
    page_numel = pools[0][0].numel()
    pool_ptrs = torch.tensor([p.data_ptr() for p in pools], dtype=torch.int64, device=staging.device)
    block = min(max_block, pow2(page_numel))
    grid = (len(pools) * n, triton.cdiv(page_numel, block))
    page_bytes = pools[0].stride(0) * pools[0].element_size()
    aligned = page_bytes % 16 == 0 and all(p.data_ptr() % 16 == 0 for p in pools)
    _page_copy_kernel[grid](
        pool_ptrs, staging, page_ids, n, page_numel, pools[0].stride(0),
        TO_STAGING=to_staging, BLOCK=block, ALIGNED=aligned,
    )  # fmt: skip


def gather_pages_triton(
    pools: list[torch.Tensor],  # each [num_pages, page_size, kv_heads, head_dim]
    page_ids: torch.Tensor,  # [n] int64
    out: torch.Tensor,  # [len(pools), n, page_size, kv_heads, head_dim]
) -> None:
    """Copy the given pages of every pool into a contiguous staging buffer."""
    _check_page_copy(pools, page_ids, out, "out")
    _page_copy(pools, page_ids, out, to_staging=True)


def scatter_pages_triton(
    staging: torch.Tensor,  # [len(pools), n, page_size, kv_heads, head_dim]
    pools: list[torch.Tensor],  # each [num_pages, page_size, kv_heads, head_dim]
    page_ids: torch.Tensor,  # [n] int64
) -> None:
    """Copy a staging buffer's pages into the given pages of every pool."""
    _check_page_copy(pools, page_ids, staging, "staging")
    _page_copy(pools, page_ids, staging, to_staging=False)
