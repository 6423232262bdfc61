"""Attention over the paged KV cache for one forward pass (the model's `AttentionBackend`).

Built by the runner for each step from the scheduled chunks: decode sequences (one new token) come
first in the flattened token batch, then extend sequences (a prefill chunk). Each layer's call
writes the new K/V into the pools at `slot_mapping`, then attends through the page tables.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pd_serve.kernels import reference as ref


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64
    num_decode: int  # the first num_decode tokens are single-token decode sequences
    decode_page_table: torch.Tensor  # [num_decode, max_pages] int32
    decode_context_lens: torch.Tensor  # [num_decode] int32
    extend_page_table: torch.Tensor  # [num_extend, max_pages] int32
    extend_query_start: torch.Tensor  # [num_extend + 1] int32, offsets after the decode tokens
    extend_context_lens: torch.Tensor  # [num_extend] int32


class PagedAttention:
    def __init__(self, k_pools: list[torch.Tensor], v_pools: list[torch.Tensor], meta: AttentionMetadata, scale: float) -> None:
        self.k_pools, self.v_pools, self.meta, self.scale = k_pools, v_pools, meta, scale

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        m = self.meta
        kp, vp = self.k_pools[layer], self.v_pools[layer]
        ref.store_kv_ref(kp, vp, k, v, m.slot_mapping)
        nd = m.num_decode
        if nd == q.shape[0]:
            return ref.paged_decode_attention_ref(q, kp, vp, m.decode_page_table, m.decode_context_lens, self.scale)
        out = torch.empty_like(q)
        if nd:
            out[:nd] = ref.paged_decode_attention_ref(
                q[:nd], kp, vp, m.decode_page_table, m.decode_context_lens, self.scale
            )
        out[nd:] = ref.extend_attention_ref(
            q[nd:], kp, vp, m.extend_page_table, m.extend_query_start, m.extend_context_lens, self.scale
        )
        return out
