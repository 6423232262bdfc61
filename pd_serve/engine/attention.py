"""Attention over the paged KV cache for one forward pass (the model's `AttentionBackend`).

Built by the runner for each step from the scheduled chunks: decode sequences (one new token) come
first in the flattened token batch, then extend sequences (a prefill chunk). Each layer's call
writes the new K/V into the pools at `slot_mapping`, then attends through the page tables.

On CPU, float32 decode runs `kernels.cpu_native` (C, reads K/V in place through the page table)
when it is available; the runner then builds no plan. Otherwise the decode path is planned once per
step and reused by every layer: sequences are sorted by context length and cut into groups of
`DECODE_GROUP`, each group's pages are gathered with one `index_select` and attended with torch's
fused SDPA. The semantics are those of `kernels.reference.paged_decode_attention_ref` and
`extend_attention_ref`; tests compare them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pd_serve.intmath import div_ceil
from pd_serve.kernels import cpu_native, cpu_ops, ops
from pd_serve.kernels import reference as ref

DECODE_GROUP = 16  # sequences padded together; small groups waste little on padding


@dataclass
class DecodeGroup:
    start: int  # this group's sequences are order[start:end] (see DecodePlan)
    end: int
    pages: torch.Tensor  # [b * n] int64, each sequence's first n page ids, row by row
    num_pages: int  # n
    mask: torch.Tensor  # [b, 1, 1, n * page_size] float32: 0 where the context has a token, -inf past it


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64
    num_decode: int  # the first num_decode tokens are single-token decode sequences
    decode_page_table: torch.Tensor  # [num_decode, max_pages] int32
    decode_context_lens: torch.Tensor  # [num_decode] int32
    extend_page_table: torch.Tensor  # [num_extend, max_pages] int32
    extend_query_start: torch.Tensor  # [num_extend + 1] int32, offsets after the decode tokens
    extend_context_lens: torch.Tensor  # [num_extend] int32
    decode_plan: DecodePlan | None = None  # the grouped-SDPA path's plan (None: kernels or cpu_native)


@dataclass
class DecodePlan:
    order: torch.Tensor  # [num_decode] int64: decode sequences sorted by context length
    groups: list[DecodeGroup]


def plan_decode(page_tables: list[list[int]], context_lens: list[int], page_size: int, device: torch.device) -> DecodePlan:
    order = sorted(range(len(context_lens)), key=context_lens.__getitem__)
    groups = []
    for start in range(0, len(order), DECODE_GROUP):
        rows = order[start : start + DECODE_GROUP]
        n = div_ceil(context_lens[rows[-1]], page_size)
        pages = [p for r in rows for p in page_tables[r][:n] + [0] * (n - len(page_tables[r][:n]))]
        lens = torch.tensor([context_lens[r] for r in rows], device=device)
        past = torch.arange(n * page_size, device=device)[None, :] >= lens[:, None]
        # additive and built once per step: a bool mask would be converted by SDPA in every layer
        mask = torch.zeros(past.shape, device=device).masked_fill_(past, float("-inf"))
        groups.append(DecodeGroup(
            start=start,
            end=start + len(rows),
            pages=torch.tensor(pages, dtype=torch.long, device=device),
            num_pages=n,
            mask=mask[:, None, None, :],
        ))
    return DecodePlan(torch.tensor(order, dtype=torch.long, device=device), groups)


class PagedAttention:
    """`kernel_backend` None: the CPU path below; "auto" or "triton": `kernels.ops` (GPU kernels)."""

    def __init__(
        self,
        k_pools: list[torch.Tensor],
        v_pools: list[torch.Tensor],
        meta: AttentionMetadata,
        scale: float,
        kernel_backend: str | None = None,
    ) -> None:
        self.k_pools, self.v_pools, self.meta, self.scale = k_pools, v_pools, meta, scale
        self.kernel_backend = kernel_backend
        if kernel_backend is None and meta.decode_plan is None and meta.num_decode:
            # cpu_native: one check of the tables for all layers (the pools share one shape)
            cpu_native.check_tables(meta.decode_page_table, meta.decode_context_lens, k_pools[0])
        pool = k_pools[0]
        # cpu_ops.store_kv trusts the slots: checked here once for all layers
        self.native_store = kernel_backend is None and cpu_ops.supports(pool.device, pool.dtype)
        slots = meta.slot_mapping
        if self.native_store and slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= pool.shape[0] * pool.shape[1]):
            raise ValueError(f"slot_mapping must be in [0, {pool.shape[0] * pool.shape[1]})")

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        m = self.meta
        kp, vp = self.k_pools[layer], self.v_pools[layer]
        if self.kernel_backend is not None:
            with ops.use_backend(self.kernel_backend):
                return self._forward_kernels(q, k, v, kp, vp)
        if self.native_store and k.is_contiguous() and v.is_contiguous():
            cpu_ops.store_kv(kp, vp, k, v, m.slot_mapping)
        else:
            ref.store_kv_ref(kp, vp, k, v, m.slot_mapping)
        nd = m.num_decode
        out = torch.empty_like(q)
        if nd:
            self._decode(q[:nd], kp, vp, out[:nd])
        if nd < q.shape[0]:
            self._extend(q[nd:], k[nd:], v[nd:], kp, vp, out[nd:])
        return out

    def _extend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor,
                out: torch.Tensor) -> None:
        """Each sequence's chunk attends causally to its cached prefix and itself (fused SDPA)."""
        m = self.meta
        _, page_size, kv_heads, head_dim = kp.shape
        starts, lens = m.extend_query_start.tolist(), m.extend_context_lens.tolist()
        for i, ctx in enumerate(lens):
            s, e = starts[i], starts[i + 1]
            q_len = e - s
            qi = q[s:e].transpose(0, 1)[None]  # [1, H, q_len, D]
            if q_len == ctx:  # no cached prefix: the chunk's own K/V, plain causal attention
                ki, vi = k[s:e].transpose(0, 1)[None], v[s:e].transpose(0, 1)[None]
                o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=self.scale, enable_gqa=True)
            else:
                n = div_ceil(ctx, page_size)
                pages = m.extend_page_table[i, :n].long()
                ki = kp.index_select(0, pages).view(1, n * page_size, kv_heads, head_dim)[:, :ctx].transpose(1, 2)
                vi = vp.index_select(0, pages).view(1, n * page_size, kv_heads, head_dim)[:, :ctx].transpose(1, 2)
                q_pos = torch.arange(ctx - q_len, ctx, device=q.device)
                mask = torch.arange(ctx, device=q.device)[None, :] <= q_pos[:, None]
                o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=self.scale, enable_gqa=True)
            out[s:e] = o[0].transpose(0, 1)

    def _forward_kernels(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor
    ) -> torch.Tensor:
        m = self.meta
        ops.store_kv(kp, vp, k, v, m.slot_mapping)
        nd = m.num_decode
        out = torch.empty_like(q)
        if nd:
            out[:nd] = ops.paged_decode_attention(q[:nd], kp, vp, m.decode_page_table, m.decode_context_lens, self.scale)
        if nd < q.shape[0]:
            out[nd:] = ops.extend_attention(
                q[nd:], kp, vp, m.extend_page_table, m.extend_query_start, m.extend_context_lens, self.scale
            )
        return out

    def _decode(self, q: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor, out: torch.Tensor) -> None:
        """q [b, H, D] -> out [b, H, D], one planned group at a time.

        The query heads that share a KV head are passed to SDPA as that head's query positions
        ([b, kv_heads, group, D]): one query token each, all seeing the same context, so no GQA
        expansion of K and V is needed."""
        _, page_size, kv_heads, head_dim = kp.shape
        num_heads = q.shape[1]
        group = num_heads // kv_heads
        plan = self.meta.decode_plan
        if plan is None:
            m = self.meta
            cpu_native.paged_decode_attention(q.contiguous(), kp, vp, m.decode_page_table, m.decode_context_lens,
                                              self.scale, out, tables_checked=True)
            return
        k_flat, v_flat = kp.view(kp.shape[0], -1), vp.view(vp.shape[0], -1)
        q_sorted = q.index_select(0, plan.order)
        out_sorted = torch.empty_like(q_sorted)
        for g in plan.groups:
            b = g.end - g.start
            length = g.num_pages * page_size
            k = k_flat.index_select(0, g.pages).view(b, length, kv_heads, head_dim).transpose(1, 2)
            v = v_flat.index_select(0, g.pages).view(b, length, kv_heads, head_dim).transpose(1, 2)
            qg = q_sorted[g.start : g.end].view(b, kv_heads, group, head_dim)
            o = F.scaled_dot_product_attention(qg, k, v, attn_mask=g.mask, scale=self.scale)
            out_sorted[g.start : g.end] = o.reshape(b, num_heads, head_dim)
        out.index_copy_(0, plan.order, out_sorted)
