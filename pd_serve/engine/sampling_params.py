"""Per-request sampling parameters, validated on construction.

Every value that passes here is safe for the engine: floats are finite (the engine messages are
JSON, where NaN and infinity would arrive as null) and integers fit in 64 bits (the codec's limit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_FLOATS = ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty")


class InvalidParameter(ValueError):
    """A sampling parameter is out of range; `param` names it (OpenAI's error `param`)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int | None = None  # None: no top-k cut
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; 0: the sampled token's; N: plus the top N alternatives
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))  # normalising the caller's input, before use
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        for name in _FLOATS:
            value = getattr(self, name)
            _check(math.isfinite(value), name, f"must be a finite number, got {value}")
        _check(self.max_tokens <= INT64_MAX, "max_tokens", f"must be at most {INT64_MAX}, got {self.max_tokens}")
        _check(self.top_k is None or self.top_k <= INT64_MAX, "top_k", f"must be at most {INT64_MAX}, got {self.top_k}")
        _check(
            self.seed is None or INT64_MIN <= self.seed <= INT64_MAX,
            "seed",
            f"must be a 64-bit signed integer ({INT64_MIN}..{INT64_MAX}), got {self.seed}",
        )
        bad_id = next((t for t in self.stop_token_ids if not 0 <= t <= INT64_MAX), None)
        _check(bad_id is None, "stop_token_ids", f"token ids must be in 0..{INT64_MAX}, got {bad_id}")
        _check(self.max_tokens >= 1, "max_tokens", f"must be at least 1, got {self.max_tokens}")
        _check(self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}")
        _check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        _check(self.top_k is None or self.top_k >= 1, "top_k", f"must be >= 1 or unset, got {self.top_k}")
        _check(0 <= self.min_p <= 1, "min_p", f"must be in [0, 1], got {self.min_p}")
        _check(self.repetition_penalty > 0, "repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        _check(-2 <= self.frequency_penalty <= 2, "frequency_penalty", f"must be in [-2, 2], got {self.frequency_penalty}")
        _check(-2 <= self.presence_penalty <= 2, "presence_penalty", f"must be in [-2, 2], got {self.presence_penalty}")
        _check(
            self.logprobs is None or 0 <= self.logprobs <= 20,
            "logprobs",
            f"must be between 0 and 20, got {self.logprobs}",
        )
        _check(all(s for s in self.stop), "stop", "stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    @property
    def max_stop_len(self) -> int:
        return max((len(s) for s in self.stop), default=0)


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise InvalidParameter(param, message)
