"""Torch reference implementations of every kernel op; the engine runs these on CPU.

They define the semantics the Triton kernels must match. They favour clarity, but the decode path
is batched (sequences grouped by context length) because it is the engine's CPU hot path.
"""

from __future__ import annotations

import torch

_DECODE_GROUP = 32  # sequences padded together in decode attention


def store_kv_ref(
    k_pool: torch.Tensor,  # [num_pages, page_size, kv_heads, head_dim]
    v_pool: torch.Tensor,  # [num_pages, page_size, kv_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64, page_id * page_size + offset
) -> None:
    """Write each new token's K and V into its slot."""
    kv_heads, head_dim = k_pool.shape[2], k_pool.shape[3]
    k_pool.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, k.to(k_pool.dtype))
    v_pool.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, v.to(v_pool.dtype))


def _attend(
    q: torch.Tensor,  # [b, kv_heads, group * q_len, head_dim]
    k: torch.Tensor,  # [b, kv_heads, ctx, head_dim]
    v: torch.Tensor,  # [b, kv_heads, ctx, head_dim]
    mask: torch.Tensor,  # broadcastable to [b, kv_heads, group * q_len, ctx], True = attend
    scale: float,
) -> torch.Tensor:
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    scores.masked_fill_(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v.float())


def _gather_context(pool: torch.Tensor, page_table: torch.Tensor, num_pages: int) -> torch.Tensor:
    """[b, max_pages] page ids -> [b, num_pages * page_size, kv_heads, head_dim]."""
    pages = pool[page_table[:, :num_pages].long()]  # [b, n, page_size, kv_heads, head_dim]
    b, n, p, h, d = pages.shape
    return pages.reshape(b, n * p, h, d)


def paged_decode_attention_ref(
    q: torch.Tensor,  # [batch, num_heads, head_dim], one query token per sequence
    k_pool: torch.Tensor,  # [num_pages, page_size, kv_heads, head_dim]
    v_pool: torch.Tensor,  # [num_pages, page_size, kv_heads, head_dim]
    page_table: torch.Tensor,  # [batch, max_pages] int32
    context_lens: torch.Tensor,  # [batch] int32, tokens in context including the query token
    scale: float,
) -> torch.Tensor:  # [batch, num_heads, head_dim], dtype of q
    batch, num_heads, head_dim = q.shape
    page_size, kv_heads = k_pool.shape[1], k_pool.shape[2]
    group = num_heads // kv_heads
    out = torch.empty_like(q)
    lens = context_lens.tolist()
    order = sorted(range(batch), key=lambda i: lens[i])
    for start in range(0, batch, _DECODE_GROUP):
        idx_list = order[start : start + _DECODE_GROUP]
        idx = torch.tensor(idx_list, device=q.device)
        max_len = lens[idx_list[-1]]
        num_pages = -(-max_len // page_size)
        k = _gather_context(k_pool, page_table[idx], num_pages).transpose(1, 2)
        v = _gather_context(v_pool, page_table[idx], num_pages).transpose(1, 2)
        qg = q[idx].view(len(idx_list), kv_heads, group, head_dim)
        positions = torch.arange(num_pages * page_size, device=q.device)
        mask = (positions[None, :] < context_lens[idx].long()[:, None])[:, None, None, :]
        o = _attend(qg, k, v, mask, scale)  # [b, kv_heads, group, head_dim]
        out[idx] = o.reshape(len(idx_list), num_heads, head_dim).to(q.dtype)
    return out


def extend_attention_ref(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim], sequences back to back
    k_pool: torch.Tensor,  # [num_pages, page_size, kv_heads, head_dim]
    v_pool: torch.Tensor,  # [num_pages, page_size, kv_heads, head_dim]
    page_table: torch.Tensor,  # [batch, max_pages] int32
    query_start: torch.Tensor,  # [batch + 1] int32, offsets of each sequence's tokens in q
    context_lens: torch.Tensor,  # [batch] int32, cached prefix + new tokens
    scale: float,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Each sequence's new tokens are the last tokens of its context; they attend causally."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    page_size, kv_heads = k_pool.shape[1], k_pool.shape[2]
    group = num_heads // kv_heads
    out = torch.empty_like(q)
    starts, lens = query_start.tolist(), context_lens.tolist()
    for i, ctx in enumerate(lens):
        s, e = starts[i], starts[i + 1]
        q_len = e - s
        num_pages = -(-ctx // page_size)
        row = page_table[i : i + 1]
        k = _gather_context(k_pool, row, num_pages)[0, :ctx].transpose(0, 1)  # [kv_heads, ctx, d]
        v = _gather_context(v_pool, row, num_pages)[0, :ctx].transpose(0, 1)
        qi = q[s:e].view(q_len, kv_heads, group, head_dim).permute(1, 2, 0, 3)
        qi = qi.reshape(kv_heads, group * q_len, head_dim)
        q_pos = (torch.arange(q_len, device=q.device) + (ctx - q_len)).repeat(group)
        mask = torch.arange(ctx, device=q.device)[None, :] <= q_pos[:, None]
        o = _attend(qi, k, v, mask[None], scale)  # [kv_heads, group * q_len, d]
        o = o.view(kv_heads, group, q_len, head_dim).permute(2, 0, 1, 3)
        out[s:e] = o.reshape(q_len, num_heads, head_dim).to(q.dtype)
    return out


def rms_norm_ref(
    x: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,  # [num_tokens, hidden]; added to x first when given
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (normed, new residual). Without a residual the new residual is x itself."""
    if residual is not None:
        x = x + residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype), x


def rotary_ref(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim], rotated in place
    k: torch.Tensor,  # [num_tokens, kv_heads, head_dim], rotated in place
    positions: torch.Tensor,  # [num_tokens] int64
    cos_sin: torch.Tensor,  # [max_positions, head_dim] float32: cos in the first half, sin in the second
) -> None:
    """Neox-style rotary embedding (rotate_half), as Hugging Face Llama applies it."""
    half = cos_sin.shape[1] // 2
    cs = cos_sin[positions]
    cos, sin = cs[:, None, :half], cs[:, None, half:]
    for t in (q, k):
        x1, x2 = t[..., :half].float(), t[..., half:].float()
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        t.copy_(rotated.to(t.dtype))


def gather_pages_ref(
    pools: list[torch.Tensor],  # each [num_pages, page_size, kv_heads, head_dim]
    page_ids: torch.Tensor,  # [n] int64
    out: torch.Tensor,  # [len(pools), n, page_size, kv_heads, head_dim]
) -> None:
    """Copy the given pages of every pool into a contiguous staging buffer."""
    for i, pool in enumerate(pools):
        torch.index_select(pool, 0, page_ids, out=out[i])


def scatter_pages_ref(
    staging: torch.Tensor,  # [len(pools), n, page_size, kv_heads, head_dim]
    pools: list[torch.Tensor],  # each [num_pages, page_size, kv_heads, head_dim]
    page_ids: torch.Tensor,  # [n] int64
) -> None:
    """Copy a staging buffer's pages into the given pages of every pool."""
    for i, pool in enumerate(pools):
        pool.index_copy_(0, page_ids, staging[i])
