"""Seeded synthetic workloads shared by the benchmarks (ShareGPT-like skewed lengths)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Item:
    prompt_token_ids: list[int]
    output_len: int


def skewed_lengths(rng: random.Random, n: int, lo: int, hi: int, median: float, sigma: float = 0.9) -> list[int]:
    """Log-normal lengths clipped to [lo, hi]: many short, a long tail (like ShareGPT)."""
    return [min(hi, max(lo, int(rng.lognormvariate(math.log(median), sigma)))) for _ in range(n)]


def sharegpt_like(
    n: int, vocab: int, seed: int = 0, prompt: tuple[int, int] = (16, 512), output: tuple[int, int] = (8, 512)
) -> list[Item]:
    rng = random.Random(seed)
    plens = skewed_lengths(rng, n, prompt[0], prompt[1], median=96)
    olens = skewed_lengths(rng, n, output[0], output[1], median=80)
    # token 0..9 are left alone: demo specials live there
    return [Item([rng.randrange(10, vocab) for _ in range(p)], o) for p, o in zip(plens, olens)]
