"""Seeded synthetic workloads shared by the benchmarks, and prompts read from a JSONL file.

Synthetic prompts are random token ids (ids 0..9 are left alone: the demo model's specials live
there); a JSONL item may carry text instead. Kinds: ShareGPT-like skewed lengths, a long-prompt mix
(ShareGPT-like, with a fraction of prompts 8-16x longer), fixed lengths.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Item:
    prompt_token_ids: list[int]
    output_len: int
    text: str | None = None  # a text prompt (JSONL); prompt_token_ids is then empty

    @property
    def prompt_len(self) -> int:
        """Tokens for synthetic prompts; for text prompts a rough count (words)."""
        return len(self.prompt_token_ids) if self.text is None else len(self.text.split())


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


def _random_ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(10, vocab) for _ in range(n)]


def long_prompt_mix(
    n: int,
    vocab: int,
    seed: int = 0,
    long_fraction: float = 0.2,
    factor: tuple[int, int] = (8, 16),
    prompt: tuple[int, int] = (16, 160),
    output: tuple[int, int] = (16, 192),
    max_prompt: int = 1792,
    output_median: float = 64,
) -> list[Item]:
    """ShareGPT-like requests, `long_fraction` of them with prompts `factor` times longer (capped).

    The long prompts are the ones whose prefill stalls a colocated engine's decode steps.
    """
    rng = random.Random(seed)
    plens = skewed_lengths(rng, n, prompt[0], prompt[1], median=64, sigma=0.6)
    olens = skewed_lengths(rng, n, output[0], output[1], median=output_median, sigma=0.6)
    longs = set(rng.sample(range(n), round(n * long_fraction)))
    plens = [min(max_prompt, p * rng.randint(*factor)) if i in longs else p for i, p in enumerate(plens)]
    return [Item(_random_ids(rng, p, vocab), o) for p, o in zip(plens, olens)]


def fixed_lengths(n: int, vocab: int, input_len: int, output_len: int, seed: int = 0) -> list[Item]:
    rng = random.Random(seed)
    return [Item(_random_ids(rng, input_len, vocab), output_len) for _ in range(n)]


def from_jsonl(path: str, default_output_len: int = 128) -> list[Item]:
    """One JSON object a line: {"prompt": "text" | [token ids], "output_len": int (optional)}."""
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            obj = json.loads(line)
            prompt, olen = obj.get("prompt"), int(obj.get("output_len", default_output_len))
            if isinstance(prompt, str):
                items.append(Item([], olen, text=prompt))
            elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
                items.append(Item(prompt, olen))
            else:
                raise ValueError(f"{path}:{lineno}: 'prompt' must be a string or a non-empty list of token ids")
    return items
