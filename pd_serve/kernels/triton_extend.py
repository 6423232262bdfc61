"""Triton extend (chunked prefill) attention over paged KV, variable lengths in one launch.

Same signature and semantics as `reference.extend_attention_ref`: each sequence's new tokens are
the last `q_len` tokens of its context, already stored in the pools (store_kv runs first), and
attend causally to the cached prefix and to themselves. One program handles BLOCK_M new tokens of
one sequence for one query head. The wrapper reads the longest chunk back from the device to size
the grid (one small sync per call, as the reference's own `.tolist()`).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from pd_serve.kernels import _checks as c
from pd_serve.kernels._triton_util import dot, is_interpreted, pow2, to_rtne, upcast_dot

_BLOCK_M = 64  # new tokens per program
_BLOCK_N = 64  # context tokens per loop step


@triton.jit
def _extend_kernel(
    q, k_pool, v_pool, page_table, query_start, context_lens, out,
    scale_log2, group, head_dim, page_size,
    q_s0, q_s1, pt_s0, kv_s_page, kv_s_tok, kv_s_head, out_s0, out_s1,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    mb, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(query_start + b)
    q_len = tl.load(query_start + b + 1) - q_start
    if mb * BLOCK_M >= q_len:
        return
    ctx = tl.load(context_lens + b)
    prefix = ctx - q_len
    i = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    q_pos = prefix + i
    d = tl.arange(0, BLOCK_D)
    dmask = d[None, :] < head_dim
    qmask = (i[:, None] < q_len) & dmask
    q_rows = (q_start + i).to(tl.int64)
    qx = tl.load(q + q_rows[:, None] * q_s0 + h * q_s1 + d[None, :], mask=qmask, other=0.0)
    kh = h // group
    kv_end = tl.minimum(ctx, prefix + (mb + 1) * BLOCK_M)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(0, kv_end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        nmask = pos < kv_end
        page = tl.load(page_table + b * pt_s0 + pos // page_size, mask=nmask, other=0).to(tl.int64)
        rows = page * kv_s_page + (pos % page_size) * kv_s_tok + kh * kv_s_head
        kvmask = nmask[:, None] & dmask
        kx = tl.load(k_pool + rows[:, None] + d[None, :], mask=kvmask, other=0.0)
        s = dot(qx, tl.trans(kx), UPCAST) * scale_log2
        s = tl.where(nmask[None, :] & (pos[None, :] <= q_pos[:, None]), s, float("-inf"))
        # Position 0 is in the first block and visible to every row, so m is finite from then on.
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(p, 1)
        vx = tl.load(v_pool + rows[:, None] + d[None, :], mask=kvmask, other=0.0)
        acc = acc * alpha[:, None] + dot(p.to(vx.dtype), vx, UPCAST)
        m = m_new
    o = acc / l_sum[:, None]
    tl.store(
        out + q_rows[:, None] * out_s0 + h * out_s1 + d[None, :], to_rtne(o, out.dtype.element_ty), mask=qmask
    )


def _check(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_pool: torch.Tensor,  # [num_pages, page_size, kv_heads, head_dim]
    v_pool: torch.Tensor,  # [num_pages, page_size, kv_heads, head_dim]
    page_table: torch.Tensor,  # [batch, max_pages]
    query_start: torch.Tensor,  # [batch + 1]
    context_lens: torch.Tensor,  # [batch]
) -> None:
    c.check_paged_kv(k_pool, v_pool)
    c.check_attention_query(q, k_pool, page_table)
    batch = page_table.shape[0]
    c.check_vector("query_start", query_start, batch + 1, "batch + 1, from page_table")
    c.check_vector("context_lens", context_lens, batch, "batch, from page_table")
    tensors = {"q": q, "k_pool": k_pool, "v_pool": v_pool, "page_table": page_table}
    tensors.update({"query_start": query_start, "context_lens": context_lens})
    c.check_devices(tensors, is_interpreted(_extend_kernel))


def extend_attention_triton(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim], sequences back to back
    k_pool: torch.Tensor,  # [num_pages, page_size, kv_heads, head_dim]
    v_pool: torch.Tensor,  # [num_pages, page_size, kv_heads, head_dim]
    page_table: torch.Tensor,  # [batch, max_pages] int32
    query_start: torch.Tensor,  # [batch + 1] int32, offsets of each sequence's tokens in q
    context_lens: torch.Tensor,  # [batch] int32, cached prefix + new tokens
    scale: float,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Each sequence's new tokens are the last tokens of its context; they attend causally."""
    _check(q, k_pool, v_pool, page_table, query_start, context_lens)
    out = torch.empty_like(q)
    extend_into(q, k_pool, v_pool, page_table, query_start, context_lens, scale, out, _BLOCK_M, _BLOCK_N)
    return out


def extend_into(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_pool: torch.Tensor,  # [num_pages, page_size, kv_heads, head_dim]
    v_pool: torch.Tensor,  # [num_pages, page_size, kv_heads, head_dim]
    page_table: torch.Tensor,  # [batch, max_pages]
    query_start: torch.Tensor,  # [batch + 1]
    context_lens: torch.Tensor,  # [batch]
    scale: float,
    out: torch.Tensor,  # [num_tokens, num_heads, head_dim], dtype of q
    block_m: int,
    block_n: int,
) -> None:
    """The launch itself, unchecked, with block sizes explicit (tests use small ones for several blocks)."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    page_size, kv_heads = k_pool.shape[1], k_pool.shape[2]
    batch = page_table.shape[0]
    if batch == 0 or q.shape[0] == 0:
        return
    max_q_len = int((query_start[1:] - query_start[:-1]).max())
    grid = (triton.cdiv(max_q_len, block_m), num_heads, batch)
    _extend_kernel[grid](
        q, k_pool, v_pool, page_table, query_start, context_lens, out,
        scale * math.log2(math.e), num_heads // kv_heads, head_dim, page_size,
        q.stride(0), q.stride(1), page_table.stride(0), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        out.stride(0), out.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=pow2(head_dim, 16),
        UPCAST=upcast_dot(q.dtype, is_interpreted(_extend_kernel)),
    )  # fmt: skip
