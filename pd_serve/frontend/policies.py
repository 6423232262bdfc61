"""Policies that pick one node among candidates: round_robin, least_load, power_of_two, prefix_aware.

A policy only chooses; which nodes are candidates (live, breaker closed, layout-compatible, not
excluded by a retry) is decided by the `Router`. `pick(candidates, load, prompt)` gets the candidates
sorted by node id, a load function and the prompt text (for prefix_aware) and returns one of them.
Policies keep small state (a counter, a prefix map) and are used from one asyncio loop only.
"""

from __future__ import annotations

import hashlib
import random
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Protocol

from pd_serve.frontend.nodes import Node

LoadFn = Callable[[Node], int]
PREFIX_BLOCK_CHARS = 64  # prefix_aware matches prompts in blocks of this many characters
PREFIX_MAP_ENTRIES = 65536  # prefix_aware remembers this many prefix blocks (least recently used go)


class Policy(Protocol):
    def pick(self, candidates: Sequence[Node], load: LoadFn, prompt: str) -> Node: ...


class RoundRobin:
    def __init__(self) -> None:
        self._next = 0

    def pick(self, candidates: Sequence[Node], load: LoadFn, prompt: str) -> Node:
        node = candidates[self._next % len(candidates)]
        self._next += 1
        return node


class LeastLoad:
    """The least loaded; ties are taken in turn, so an idle cluster still spreads its requests."""

    def __init__(self) -> None:
        self._turn = RoundRobin()

    def pick(self, candidates: Sequence[Node], load: LoadFn, prompt: str) -> Node:
        lowest = min(load(n) for n in candidates)
        return self._turn.pick([n for n in candidates if load(n) == lowest], load, prompt)


class PowerOfTwo:
    """Two candidates drawn at random; the less loaded of the two."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(self, candidates: Sequence[Node], load: LoadFn, prompt: str) -> Node:
        if len(candidates) == 1:
            return candidates[0]
        a, b = self._rng.sample(list(candidates), 2)
        return a if load(a) <= load(b) else b


class PrefixAware:
    """The node that served the longest shared prompt prefix, unless its load exceeds the least
    loaded candidate's by more than `balance`; then the least loaded, which becomes the prefix's owner.

    Prefixes are the prompt's first `max_chars` characters in blocks of PREFIX_BLOCK_CHARS, each block
    keyed by a hash of everything up to its end (a radix tree flattened into a bounded LRU map).
    """

    def __init__(self, max_chars: int = 256, balance: float = 4.0) -> None:
        self.max_chars = max_chars
        self.balance = balance
        self._owners: OrderedDict[bytes, str] = OrderedDict()
        self._fallback = LeastLoad()

    def pick(self, candidates: Sequence[Node], load: LoadFn, prompt: str) -> Node:
        keys = prefix_keys(prompt, self.max_chars)
        by_id = {n.node_id: n for n in candidates}
        lowest = min(load(n) for n in candidates)
        chosen = None
        for key in reversed(keys):  # longest prefix first
            owner = by_id.get(self._owners.get(key, ""))
            if owner is not None:
                chosen = owner if load(owner) <= lowest + self.balance else None
                break
        if chosen is None:
            chosen = self._fallback.pick(candidates, load, prompt)
        self._remember(keys, chosen.node_id)
        return chosen

    def owner(self, prompt: str) -> str | None:
        keys = prefix_keys(prompt, self.max_chars)
        return self._owners.get(keys[-1]) if keys else None

    def _remember(self, keys: list[bytes], node_id: str) -> None:
        for key in keys:
            self._owners[key] = node_id
            self._owners.move_to_end(key)
        while len(self._owners) > PREFIX_MAP_ENTRIES:
            self._owners.popitem(last=False)


def prefix_keys(prompt: str, max_chars: int) -> list[bytes]:
    """One key per whole or final partial block of the prompt's first `max_chars` characters."""
    text = prompt[:max_chars]
    digest = hashlib.blake2b(digest_size=16)
    keys = []
    for start in range(0, len(text), PREFIX_BLOCK_CHARS):
        digest.update(text[start : start + PREFIX_BLOCK_CHARS].encode("utf-8", "surrogatepass"))
        keys.append(digest.copy().digest())
    return keys


def make_policy(name: str, prefix_chars: int = 256, balance: float = 4.0) -> Policy:
    if name == "round_robin":
        return RoundRobin()
    if name == "least_load":
        return LeastLoad()
    if name == "power_of_two":
        return PowerOfTwo()
    if name == "prefix_aware":
        return PrefixAware(prefix_chars, balance)
    raise ValueError(f"unknown policy {name!r}")
