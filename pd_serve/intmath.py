"""Integer arithmetic shared by every package (the engine, the transfer layer, the frontend).

It imports nothing, so any module may use it; it must never grow beyond plain integer helpers.
"""

from __future__ import annotations


def div_ceil(a: int, b: int) -> int:
    """a / b rounded up, for non-negative a and positive b: the pages that hold `a` tokens."""
    return -(-a // b)
