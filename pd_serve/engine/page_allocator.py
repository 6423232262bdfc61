"""Reference-counted allocator of KV pages.

A page is in exactly one of three places: the free list, in use (reference count > 0), or cached
and unreferenced (held by the prefix cache, evictable, LRU order). Allocation takes free pages
first, then evicts the least recently used cached pages.
"""

from __future__ import annotations

from collections import deque

from pd_serve.engine.prefix_cache import PrefixCache


class PageAllocator:
    def __init__(self, num_pages: int, prefix_cache: PrefixCache | None = None) -> None:
        self.num_pages = num_pages
        self.cache = prefix_cache
        self._free: deque[int] = deque(range(num_pages))
        self._refs = [0] * num_pages

    @property
    def num_free(self) -> int:
        """Pages an allocation can get now (free plus evictable)."""
        return len(self._free) + (self.cache.num_evictable if self.cache else 0)

    def ref_count(self, page: int) -> int:
        return self._refs[page]

    def allocate(self, n: int, reserve: int = 0) -> list[int] | None:
        """n fresh pages with one reference each, or None (nothing changed) if fewer than
        n + `reserve` can be had."""
        if n + reserve > self.num_free:
            return None
        take = min(n, len(self._free))
        pages = [self._free.popleft() for _ in range(take)]
        if take < n:
            assert self.cache is not None
            pages += self.cache.evict(n - take)
        for p in pages:
            self._refs[p] = 1
        return pages

    def share(self, pages: list[int]) -> None:
        """Take one more reference on pages that are in use or cached."""
        for p in pages:
            if self._refs[p] == 0 and self.cache is not None:
                self.cache.mark_in_use(p)
            self._refs[p] += 1

    def release(self, pages: list[int]) -> None:
        for p in pages:
            refs = self._refs[p]
            if refs <= 0:
                raise RuntimeError(f"page {p} released more often than referenced")
            self._refs[p] = refs - 1
            if refs == 1:
                if self.cache is not None and self.cache.holds(p):
                    self.cache.mark_evictable(p)
                else:
                    self._free.append(p)

    def flush_cache(self) -> int:
        """Drop every prefix-cache entry; unreferenced cached pages become free. Returns how many."""
        if self.cache is None:
            return 0
        freed = self.cache.clear()
        self._free.extend(freed)
        return len(freed)
