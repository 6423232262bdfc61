"""Prefix cache at page granularity: a hash chain over full pages of tokens.

A full page's key is the hash of (previous page's key, the page's tokens), so equal keys mean equal
prefixes. The cache maps keys to pages; it never owns references. Pages whose reference count drops
to zero stay cached in LRU order until the allocator evicts them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

_ROOT = 0x5F3759DF


def page_hashes(tokens: Sequence[int], page_size: int, start: int = 0, parent: int | None = None) -> list[int]:
    """Keys of the full pages of `tokens`, beginning at page index `start` (chained from `parent`)."""
    keys = []
    h = _ROOT if parent is None else parent
    for i in range(start, len(tokens) // page_size):
        h = hash((h, tuple(tokens[i * page_size : (i + 1) * page_size])))
        keys.append(h)
    return keys


class PrefixCache:
    def __init__(self) -> None:
        self._by_key: dict[int, int] = {}
        self._key_of: dict[int, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self.queried_tokens = 0
        self.hit_tokens = 0

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    @property
    def num_cached(self) -> int:
        return len(self._by_key)

    def holds(self, page: int) -> bool:
        return page in self._key_of

    def match(self, keys: Sequence[int]) -> list[int]:
        """Pages of the longest cached prefix of `keys` (no references taken)."""
        pages = []
        for k in keys:
            page = self._by_key.get(k)
            if page is None:
                break
            pages.append(page)
        return pages

    def record_lookup(self, queried: int, hit: int) -> None:
        self.queried_tokens += queried
        self.hit_tokens += hit

    def insert(self, key: int, page: int) -> bool:
        """Cache `page` under `key`; False if the key is cached already (the page stays private)."""
        if key in self._by_key or page in self._key_of:
            return False
        self._by_key[key] = page
        self._key_of[page] = key
        return True

    def mark_in_use(self, page: int) -> None:
        self._evictable.pop(page, None)

    def mark_evictable(self, page: int) -> None:
        self._evictable[page] = None

    def evict(self, n: int) -> list[int]:
        pages = []
        for _ in range(n):
            page, _ = self._evictable.popitem(last=False)
            del self._by_key[self._key_of.pop(page)]
            pages.append(page)
        return pages

    def clear(self) -> list[int]:
        """Forget every entry; returns the unreferenced pages, which the caller frees."""
        freed = list(self._evictable)
        self._evictable.clear()
        self._by_key.clear()
        self._key_of.clear()
        return freed
