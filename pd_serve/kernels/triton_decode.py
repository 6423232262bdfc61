"""Triton paged decode attention: one query token per sequence, GQA, split-K (flash-decoding).

Same signature and semantics as `reference.paged_decode_attention_ref`. One program handles one
(sequence, kv head, split): all the query heads of that kv head's group attend to the split's
share of the context, so each K/V row is read once per group. With more than one split, a second
kernel combines the splits' partial outputs by their log-sum-exp.

The split length comes from the page table's width (no device sync), so the engine should pass a
page table trimmed to the batch's longest context for split-K to follow the real lengths.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from pd_serve.kernels import _checks as c
from pd_serve.kernels._triton_util import dot, is_interpreted, pow2, to_rtne, upcast_dot

_BLOCK_N = 64  # context tokens per loop step
_MIN_SPLIT = 256  # fewest context tokens worth a split of their own
_MAX_SPLITS = 32


@triton.jit
def _decode_split_kernel(
    q, k_pool, v_pool, page_table, context_lens, o_part, lse_part, out,
    scale_log2, split_len, group, head_dim, page_size,
    q_s0, q_s1, pt_s0, kv_s_page, kv_s_tok, kv_s_head,
    op_s0, op_s1, op_s2, lse_s0, lse_s1, out_s0, out_s1,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DIRECT: tl.constexpr,
):  # fmt: skip
    b, kh, sp = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ctx = tl.load(context_lens + b)
    start = sp * split_len
    end = tl.minimum(start + split_len, ctx)
    g = tl.arange(0, BLOCK_G)
    heads = kh * group + g
    d = tl.arange(0, BLOCK_D)
    qmask = (g[:, None] < group) & (d[None, :] < head_dim)
    qx = tl.load(q + b * q_s0 + heads[:, None] * q_s1 + d[None, :], mask=qmask, other=0.0)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        nmask = pos < end
        page = tl.load(page_table + b * pt_s0 + pos // page_size, mask=nmask, other=0).to(tl.int64)
        rows = page * kv_s_page + (pos % page_size) * kv_s_tok + kh * kv_s_head
        kvmask = nmask[:, None] & (d[None, :] < head_dim)
        kx = tl.load(k_pool + rows[:, None] + d[None, :], mask=kvmask, other=0.0)
        s = dot(qx, tl.trans(kx), UPCAST) * scale_log2
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(p, 1)
        vx = tl.load(v_pool + rows[:, None] + d[None, :], mask=kvmask, other=0.0)
        acc = acc * alpha[:, None] + dot(p.to(vx.dtype), vx, UPCAST)
        m = m_new
    has = l_sum > 0
    o = acc / tl.where(has, l_sum, 1.0)[:, None]
    if DIRECT:
        tl.store(
            out + b * out_s0 + heads[:, None] * out_s1 + d[None, :],
            to_rtne(o, out.dtype.element_ty),
            mask=qmask,
        )
    else:
        o_at = o_part + b * op_s0 + heads[:, None] * op_s1 + sp * op_s2 + d[None, :]
        tl.store(o_at, o, mask=qmask)
        lse = tl.where(has, m + tl.log2(tl.where(has, l_sum, 1.0)), float("-inf"))
        tl.store(lse_part + b * lse_s0 + heads * lse_s1 + sp, lse, mask=g < group)


@triton.jit
def _combine_kernel(
    o_part, lse_part, out, num_splits, head_dim,
    op_s0, op_s1, op_s2, lse_s0, lse_s1, out_s0, out_s1,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    b, h = tl.program_id(0), tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    smask = s < num_splits
    lse = tl.load(lse_part + b * lse_s0 + h * lse_s1 + s, mask=smask, other=float("-inf"))
    w = tl.where(smask, tl.exp2(lse - tl.max(lse, 0)), 0.0)
    omask = smask[:, None] & (d[None, :] < head_dim)
    o = tl.load(o_part + b * op_s0 + h * op_s1 + s[:, None] * op_s2 + d[None, :], mask=omask, other=0.0)
    res = tl.sum(w[:, None] * o, 0) / tl.sum(w, 0)
    tl.store(out + b * out_s0 + h * out_s1 + d, to_rtne(res, out.dtype.element_ty), mask=d < head_dim)


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _pick_splits(batch: int, kv_heads: int, capacity: int, device: torch.device) -> int:
    """Enough (sequence, kv head, split) programs to fill the GPU twice over, none shorter than _MIN_SPLIT."""
    wanted = triton.cdiv(2 * _sm_count(device), batch * kv_heads)
    return max(1, min(wanted, triton.cdiv(capacity, _MIN_SPLIT), _MAX_SPLITS))


def _check(
    q: torch.Tensor,  # [batch, num_heads, head_dim]
    k_pool: torch.Tensor,  # [num_pages, page_size, kv_heads, head_dim]
    v_pool: torch.Tensor,  # [num_pages, page_size, kv_heads, head_dim]
    page_table: torch.Tensor,  # [batch, max_pages]
    context_lens: torch.Tensor,  # [batch]
) -> None:
    c.check_paged_kv(k_pool, v_pool)
    c.check_attention_query(q, k_pool, page_table)
    c.check_size("page_table", page_table, 0, q.shape[0], "batch of q")
    c.check_vector("context_lens", context_lens, q.shape[0], "batch")
    tensors = {
        "q": q,
        "k_pool": k_pool,
        "v_pool": v_pool,
        "page_table": page_table,
        "context_lens": context_lens,
    }
    c.check_devices(tensors, is_interpreted(_decode_split_kernel))


def paged_decode_attention_triton(
    q: torch.Tensor,  # [batch, num_heads, head_dim], one query token per sequence
    k_pool: torch.Tensor,  # [num_pages, page_size, kv_heads, head_dim]
    v_pool: torch.Tensor,  # [num_pages, page_size, kv_heads, head_dim]
    page_table: torch.Tensor,  # [batch, max_pages] int32
    context_lens: torch.Tensor,  # [batch] int32, tokens in context including the query token
    scale: float,
) -> torch.Tensor:  # [batch, num_heads, head_dim], dtype of q
    _check(q, k_pool, v_pool, page_table, context_lens)
    capacity = page_table.shape[1] * k_pool.shape[1]
    splits = _pick_splits(q.shape[0], k_pool.shape[2], capacity, q.device)
    out = torch.empty_like(q)
    decode_into(q, k_pool, v_pool, page_table, context_lens, scale, out, splits, _BLOCK_N)
    return out


def decode_into(
    q: torch.Tensor,  # [batch, num_heads, head_dim]
    k_pool: torch.Tensor,  # [num_pages, page_size, kv_heads, head_dim]
    v_pool: torch.Tensor,  # [num_pages, page_size, kv_heads, head_dim]
    page_table: torch.Tensor,  # [batch, max_pages]
    context_lens: torch.Tensor,  # [batch]
    scale: float,
    out: torch.Tensor,  # [batch, num_heads, head_dim], dtype of q, contiguous
    num_splits: int,
    block_n: int,
) -> None:
    """The launch itself, unchecked, with the split count and block explicit (tests force split-K)."""
    batch, num_heads, head_dim = q.shape
    page_size, kv_heads = k_pool.shape[1], k_pool.shape[2]
    if batch == 0:
        return
    capacity = max(page_table.shape[1] * page_size, 1)
    split_len = triton.cdiv(triton.cdiv(capacity, num_splits), block_n) * block_n
    num_splits = triton.cdiv(capacity, split_len)
    o_part = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
    block_d = pow2(head_dim, 16)
    _decode_split_kernel[(batch, kv_heads, num_splits)](
        q, k_pool, v_pool, page_table, context_lens, o_part, lse, out,
        scale * math.log2(math.e), split_len, num_heads // kv_heads, head_dim, page_size,
        q.stride(0), q.stride(1), page_table.stride(0), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        o_part.stride(0), o_part.stride(1), o_part.stride(2), lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1),
        BLOCK_G=pow2(num_heads // kv_heads, 16), BLOCK_N=block_n, BLOCK_D=block_d,
        UPCAST=upcast_dot(q.dtype, is_interpreted(_decode_split_kernel)), DIRECT=num_splits == 1,
    )  # fmt: skip
    if num_splits > 1:
        _combine_kernel[(batch, num_heads)](
            o_part, lse, out, num_splits, head_dim,
            o_part.stride(0), o_part.stride(1), o_part.stride(2), lse.stride(0), lse.stride(1),
            out.stride(0), out.stride(1),
            BLOCK_S=pow2(num_splits), BLOCK_D=block_d,
        )  # fmt: skip
