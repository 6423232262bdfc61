"""The registered KV pools and how page lists become transfer segments.

A page run is `[start, count]` of consecutive destination pages whose source pages are consecutive
too; runs are what moves as one contiguous region. When the average run is small, the sender
gathers the pages into one staging buffer instead of sending many tiny messages. This module never
does I/O; it only builds views, plans and copies.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from pd_serve.kernels.reference import gather_pages_ref, scatter_pages_ref
from pd_serve.kv_layout import KVLayout

MAX_REGION_BYTES = 1 << 30  # one region per process_vm_readv iovec / UCX message at most
STAGING_CACHE_BYTES = 1 << 30  # staging buffers kept for reuse: at most this many bytes,
STAGING_CACHE_POOL_SHARE = 8  # and at most 1/8 of the KV pools' bytes


class Run(NamedTuple):
    src: int
    dst: int
    pages: int


def coalesce(src_pages: list[int], dst_pages: list[int], max_pages: int = 1 << 30) -> list[Run]:
    """Merge consecutive (src, dst) pairs into runs contiguous on both sides, of <= max_pages."""
    runs: list[Run] = []
    for s, d in zip(src_pages, dst_pages):
        last = runs[-1] if runs else None
        if last and last.pages < max_pages and last.src + last.pages == s and last.dst + last.pages == d:
            runs[-1] = Run(last.src, last.dst, last.pages + 1)
        else:
            runs.append(Run(s, d, 1))
    return runs


def expand(runs: list[list[int]]) -> list[int]:
    """[start, count] runs -> page ids in order."""
    return [start + i for start, count in runs for i in range(count)]


class PoolSet:
    """Per layer one K and one V pool, `[num_pages, page_size, num_kv_heads, head_dim]` each."""

    def __init__(
        self, pools: list[tuple[torch.Tensor, torch.Tensor]], fingerprint: KVLayout
    ) -> None:
        check_pools(pools, fingerprint)
        self.pools = pools
        self.fingerprint = fingerprint
        self.num_pages = pools[0][0].shape[0]
        self.page_bytes = pools[0][0][0].numel() * pools[0][0].element_size()
        self.device = pools[0][0].device
        self.max_run_pages = max(1, MAX_REGION_BYTES // self.page_bytes)
        pool_bytes = sum(t.numel() * t.element_size() for pair in pools for t in pair)
        self.staging_cache_bytes = min(STAGING_CACHE_BYTES, pool_bytes // STAGING_CACHE_POOL_SHARE)
        self._free: list[torch.Tensor] = []  # whole flat staging allocations to reuse (first touch is costly)

    @property
    def num_layers(self) -> int:
        return len(self.pools)

    def check_pages(self, pages: list[int], name: str) -> None:
        bad = next((p for p in pages if not 0 <= p < self.num_pages), None)
        if bad is not None:
            raise ValueError(f"{name}: page id {bad} is outside 0..{self.num_pages - 1}")

    def run_views(self, layers: range, runs: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Contiguous views in wire byte order: per layer, K then V, per run."""
        return [
            pool[start : start + count]
            for layer in layers
            for pool in self.pools[layer]
            for start, count in runs
        ]

    def bases(self, layers: range) -> list[int]:
        """data_ptr of each pool in wire order: per layer, K then V."""
        return [pool.data_ptr() for layer in layers for pool in self.pools[layer]]

    def regions(
        self, bases: list[int], starts: list[int], counts: list[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """(addresses, lengths) of every run in every pool, in wire order, without Python loops."""
        base = np.asarray(bases, dtype=np.uint64)[:, None]
        offsets = np.asarray(starts, dtype=np.uint64)[None, :] * np.uint64(self.page_bytes)
        lengths = np.asarray(counts, dtype=np.uint64) * np.uint64(self.page_bytes)
        return (base + offsets).reshape(-1), np.tile(lengths, len(bases))

    def staging(self, layers: range, num_pages: int) -> torch.Tensor:
        """A [layers * (K, V), n, page, heads, dim] buffer, reused when one is free."""
        k = self.pools[0][0]
        shape = (len(layers) * 2, num_pages, *k.shape[1:])
        numel = len(layers) * 2 * num_pages * k[0].numel()
        fits = [i for i, buf in enumerate(self._free) if buf.numel() >= numel]
        if fits:  # the smallest that fits, so small rooms do not take the large buffers
            return self._free.pop(min(fits, key=lambda i: self._free[i].numel()))[:numel].view(shape)
        return torch.empty(numel, dtype=k.dtype, device=k.device).view(shape)

    def release(self, staging: torch.Tensor) -> None:
        """Give a buffer from `staging()` back. Its whole allocation is kept for reuse while the
        cache stays within `staging_cache_bytes` (a reused buffer is a view of a larger one: the
        allocation, not the view, is what stays resident)."""
        flat = staging._base if staging._base is not None else staging.view(-1)
        cached = sum(b.numel() * b.element_size() for b in self._free)
        if cached + flat.numel() * flat.element_size() <= self.staging_cache_bytes:
            self._free.append(flat)

    def _flat_pools(self, layers: range) -> list[torch.Tensor]:
        return [pool for layer in layers for pool in self.pools[layer]]

    def gather(self, layers: range, pages: list[int], out: torch.Tensor) -> torch.Tensor:
        ids = torch.tensor(pages, dtype=torch.int64, device=self.device)
        gather_pages_ref(self._flat_pools(layers), ids, out)
        return out

    def scatter(self, staging: torch.Tensor, layers: range, pages: list[int]) -> None:
        ids = torch.tensor(pages, dtype=torch.int64, device=self.device)
        scatter_pages_ref(staging, self._flat_pools(layers), ids)


def check_pools(pools: list[tuple[torch.Tensor, torch.Tensor]], fp: KVLayout) -> None:
    """Raise ValueError naming the field when the pools do not match the fingerprint."""
    if len(pools) != fp.num_layers:
        raise ValueError(f"pools: {len(pools)} layers but fingerprint num_layers is {fp.num_layers}")
    expected_tail = (fp.page_size, fp.num_kv_heads, fp.head_dim)
    first = pools[0][0]
    for layer, pair in enumerate(pools):
        for name, pool in zip("KV", pair):
            where = f"pools[{layer}].{name}"
            if pool.dim() != 4 or tuple(pool.shape[1:]) != expected_tail:
                raise ValueError(
                    f"{where}: shape {tuple(pool.shape)} is not [num_pages, {', '.join(map(str, expected_tail))}]"
                )
            if str(pool.dtype).removeprefix("torch.") != fp.dtype:
                raise ValueError(f"{where}: dtype {pool.dtype} differs from fingerprint dtype {fp.dtype}")
            if pool.shape[0] != first.shape[0] or pool.device != first.device:
                raise ValueError(f"{where}: num_pages/device differ from pools[0].K")
            if not pool.is_contiguous():
                raise ValueError(f"{where}: must be contiguous")


def should_stage(runs: list[Run], page_bytes: int, min_run_bytes: int) -> bool:
    """Gather when the average contiguous run is smaller than `min_run_bytes`."""
    pages = sum(r.pages for r in runs)
    return len(runs) > 1 and pages * page_bytes < len(runs) * min_run_bytes
