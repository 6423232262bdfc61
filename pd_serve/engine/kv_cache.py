"""The KV pools: per layer one K and one V tensor `[num_pages, page_size, num_kv_heads, head_dim]`.

This is the layout the transfer layer moves and the fingerprint nodes publish. The pools are
allocated once; pages are handed out by `PageAllocator`, never by this module.
"""

from __future__ import annotations

import torch

from pd_serve.config import ConfigError
from pd_serve.kv_layout import KVLayout
from pd_serve.model.config import ModelConfig


def bytes_per_token(model: ModelConfig, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * model.num_layers * model.num_kv_heads * model.head_dim * elem


def num_pages_for(
    model: ModelConfig, dtype: torch.dtype, page_size: int, max_total_tokens: int | None, memory: int
) -> int:
    if max_total_tokens is not None:
        return max_total_tokens // page_size
    pages = memory // (bytes_per_token(model, dtype) * page_size)
    if pages < 1:
        raise ConfigError(
            f"kv_cache_memory (--kv-cache-memory): {memory} bytes hold less than one page of "
            f"{page_size} tokens ({bytes_per_token(model, dtype) * page_size} bytes)"
        )
    return pages


class KVCache:
    def __init__(self, model: ModelConfig, num_pages: int, page_size: int, dtype: torch.dtype, device: torch.device) -> None:
        self.num_pages, self.page_size = num_pages, page_size
        shape = (num_pages, page_size, model.num_kv_heads, model.head_dim)
        # zeros, not empty: a page never written must not hold NaN that a masked read could spread
        self.k_pools = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(model.num_layers)]
        self.v_pools = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(model.num_layers)]
        self.layout = KVLayout(
            architecture=model.architecture,
            num_layers=model.num_layers,
            num_kv_heads=model.num_kv_heads,
            head_dim=model.head_dim,
            dtype=str(dtype).removeprefix("torch."),
            page_size=page_size,
            config_hash=model.config_hash,
        )

    @property
    def nbytes(self) -> int:
        """Bytes of all K and V pools together."""
        return sum(pool.numel() * pool.element_size() for pool in (*self.k_pools, *self.v_pools))

    def pools(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(zip(self.k_pools, self.v_pools))
