"""The KV pools: per layer one K and one V tensor `[num_pages, page_size, num_kv_heads, head_dim]`.

This is the layout the transfer layer moves and the fingerprint nodes publish. The pools are
allocated once; pages are handed out by `PageAllocator`, never by this module. Their size comes
from `--max-total-tokens`, else from `--kv-cache-memory` (`pd_serve.kv_budget`). On CPU all pools
are views of one anonymous memory map: zero pages the kernel provides on first touch, so a large
pool costs memory only as far as it is used.
"""

from __future__ import annotations

import mmap

import torch

from pd_serve.config import ConfigError
from pd_serve.kv_layout import KVLayout
from pd_serve.model.config import ModelConfig


def bytes_per_token(model: ModelConfig, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * model.num_layers * model.num_kv_heads * model.head_dim * elem


def num_pages_for(
    model: ModelConfig, dtype: torch.dtype, page_size: int, max_total_tokens: int | None, memory: int, how: str
) -> int:
    """Pages of `page_size` tokens: `max_total_tokens` worth, else as many as `memory` bytes hold
    (`how` says where that number came from, for the error)."""
    if max_total_tokens is not None:
        return max_total_tokens // page_size
    pages = memory // (bytes_per_token(model, dtype) * page_size)
    if pages < 1:
        raise ConfigError(
            f"kv_cache_memory (--kv-cache-memory): {memory} bytes ({how}) hold less than one page of "
            f"{page_size} tokens ({bytes_per_token(model, dtype) * page_size} bytes)"
        )
    return pages


class KVCache:
    def __init__(self, model: ModelConfig, num_pages: int, page_size: int, dtype: torch.dtype, device: torch.device) -> None:
        self.num_pages, self.page_size = num_pages, page_size
        shape = (2 * model.num_layers, num_pages, page_size, model.num_kv_heads, model.head_dim)
        # zeros, not empty: a page never written must not hold NaN that a masked read could spread
        if device.type == "cpu":
            self._map = mmap.mmap(-1, bytes_per_token(model, dtype) * num_pages * page_size)
            pools = torch.frombuffer(self._map, dtype=dtype).view(shape)  # the map's pages are zero
        else:
            pools = torch.zeros(shape, dtype=dtype, device=device)
        self.k_pools = [pools[i] for i in range(model.num_layers)]
        self.v_pools = [pools[model.num_layers + i] for i in range(model.num_layers)]
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
