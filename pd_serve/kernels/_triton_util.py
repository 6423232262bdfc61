"""Small helpers for the Triton wrappers: block sizes and whether a kernel runs under the interpreter.

Imports triton, so only the Triton kernel modules import it, and only the dispatch module imports
those, lazily.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def is_interpreted(kernel: object) -> bool:
    """True when `kernel` was decorated with TRITON_INTERPRET=1 (it then runs on CPU tensors)."""
    return not isinstance(kernel, triton.runtime.JITFunction)


def pow2(n: int, floor: int = 1) -> int:
    return max(triton.next_power_of_2(n), floor)


def upcast_dot(dtype: torch.dtype, interpreted: bool) -> bool:
    """Whether tl.dot operands go to float32 first.

    float32 inputs stay exact that way (no tf32); and triton 3.9's interpreter multiplies bfloat16
    operands as their raw uint16 bits, so under the interpreter every dtype is upcast.
    """
    return interpreted or dtype == torch.float32


@triton.jit
def dot(a, b, UPCAST: tl.constexpr):
    """a @ b accumulated in float32; exact float32 (ieee) when UPCAST, see upcast_dot."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def to_rtne(x, dtype: tl.constexpr):
    """float32 x in dtype, rounded to nearest even.

    Same as x.to(dtype) on a GPU, but spelled out for bfloat16 because triton 3.9's interpreter
    truncates in that cast, and chained roundings (RMSNorm) then drift past test tolerances.
    """
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        out = bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
    else:
        out = x.to(dtype)
    return out
