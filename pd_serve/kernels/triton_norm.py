"""Triton RMSNorm with fused residual add, and neox-style rotary embedding applied in place.

Same signatures and semantics as `reference.rms_norm_ref` and `reference.rotary_ref`, rounding
included: the residual sum is rounded to x's dtype, the normed value is rounded to x's dtype
before the weight multiplies it, and the result has the dtype torch promotes weight and x to.
Llama3-scaled rope needs nothing here: the caller's cos/sin table carries the scaling.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pd_serve.kernels import _checks as c
from pd_serve.kernels._triton_util import is_interpreted, pow2, to_rtne


@triton.jit
def _rms_norm_kernel(
    x, residual, weight, out, res_out, eps, hidden,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64) * hidden
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    s = tl.load(x + row + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual + row + offs, mask=mask, other=0.0)
        s = to_rtne(s.to(tl.float32) + r.to(tl.float32), x.dtype.element_ty)
        tl.store(res_out + row + offs, s, mask=mask)
    h = s.to(tl.float32)
    normed = h * tl.rsqrt(tl.sum(h * h, 0) / hidden + eps)
    normed = to_rtne(normed, x.dtype.element_ty).to(tl.float32)
    w = tl.load(weight + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out + row + offs, to_rtne(w * normed, out.dtype.element_ty), mask=mask)


def rms_norm_triton(
    x: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,  # [num_tokens, hidden]; added to x first when given
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (normed, new residual). Without a residual the new residual is x itself.

    Leading dims are flattened, so [num_tokens, heads, head_dim] (per-head q/k norm) works too.
    """
    if x.dim() < 1:
        raise ValueError("x: expected at least 1 dim [..., hidden], got a scalar")
    hidden = x.shape[-1]
    c.check_dtype("x", x, c.FLOAT_DTYPES)
    c.check_dim("weight", weight, 1, "[hidden]")
    c.check_size("weight", weight, 0, hidden, "hidden of x")
    c.check_dtype("weight", weight, c.FLOAT_DTYPES)
    tensors = {"x": x, "weight": weight}
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"residual: shape {tuple(residual.shape)} differs from x's {tuple(x.shape)}")
        c.check_same_dtype("residual", residual, "x", x)
        tensors["residual"] = residual
    c.check_devices(tensors, is_interpreted(_rms_norm_kernel))
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if residual is None:
        rms_norm_into(x, weight, eps, None, out, None)
        return out, x
    new_residual = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rms_norm_into(x, weight, eps, residual, out, new_residual)
    return out, new_residual


def rms_norm_into(
    x: torch.Tensor,  # [..., hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None,  # [..., hidden], dtype of x
    out: torch.Tensor,  # [..., hidden] contiguous, dtype promote_types(weight, x)
    new_residual: torch.Tensor | None,  # [..., hidden] contiguous, dtype of x; given with residual
) -> None:
    """The launch itself, unchecked, into given outputs."""
    hidden = x.shape[-1]
    xc = x.contiguous()
    rows = xc.numel() // max(hidden, 1)
    if rows == 0 or hidden == 0:
        return
    res = residual.contiguous() if residual is not None else xc
    _rms_norm_kernel[(rows,)](
        xc, res, weight.contiguous(), out, new_residual if new_residual is not None else xc,
        eps, hidden, HAS_RESIDUAL=residual is not None, BLOCK=pow2(hidden),
    )  # fmt: skip


@triton.jit
def _rotate_heads(
    t, tok, s_tok, s_head, heads, cos, sin, half, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr
):
    h = tl.arange(0, BLOCK_H)[:, None]
    j = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (h < heads) & (j < half)
    at = t + tok * s_tok + h * s_head + j
    x1 = tl.load(at, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(at + half, mask=mask, other=0.0).to(tl.float32)
    tl.store(at, to_rtne(x1 * cos - x2 * sin, t.dtype.element_ty), mask=mask)
    tl.store(at + half, to_rtne(x2 * cos + x1 * sin, t.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    q, k, positions, cos_sin,
    q_s_tok, q_s_head, k_s_tok, k_s_head, cs_s_pos,
    q_heads, k_heads, half,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions + tok).to(tl.int64)
    j = tl.arange(0, BLOCK_HALF)[None, :]
    cs = cos_sin + pos * cs_s_pos + j
    cos = tl.load(cs, mask=j < half, other=0.0)
    sin = tl.load(cs + half, mask=j < half, other=0.0)
    _rotate_heads(q, tok, q_s_tok, q_s_head, q_heads, cos, sin, half, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(k, tok, k_s_tok, k_s_head, k_heads, cos, sin, half, BLOCK_HK, BLOCK_HALF)


def _check_rotary(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, kv_heads, head_dim]
    positions: torch.Tensor,  # [num_tokens]
    cos_sin: torch.Tensor,  # [max_positions, head_dim]
) -> None:
    for name, t in (("q", q), ("k", k)):
        c.check_dim(name, t, 3, "[num_tokens, heads, head_dim]")
        c.check_dtype(name, t, c.FLOAT_DTYPES)
        c.check_last_contiguous(name, t)
    c.check_size("k", k, 0, q.shape[0], "num_tokens of q")
    c.check_size("k", k, 2, q.shape[2], "head_dim of q")
    c.check_vector("positions", positions, q.shape[0], "num_tokens")
    c.check_dim("cos_sin", cos_sin, 2, "[max_positions, head_dim]")
    c.check_size("cos_sin", cos_sin, 1, q.shape[2], "head_dim of q: cos then sin")
    c.check_dtype("cos_sin", cos_sin, (torch.float32,))
    c.check_last_contiguous("cos_sin", cos_sin)
    if q.shape[2] % 2:
        raise ValueError(f"q: head_dim {q.shape[2]} must be even for rotary")
    tensors = {"q": q, "k": k, "positions": positions, "cos_sin": cos_sin}
    c.check_devices(tensors, is_interpreted(_rotary_kernel))


def rotary_triton(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim], rotated in place
    k: torch.Tensor,  # [num_tokens, kv_heads, head_dim], rotated in place
    positions: torch.Tensor,  # [num_tokens] int64
    cos_sin: torch.Tensor,  # [max_positions, head_dim] float32: cos in the first half, sin in the second
) -> None:
    """Neox-style rotary embedding (rotate_half), as Hugging Face Llama applies it."""
    _check_rotary(q, k, positions, cos_sin)
    if q.shape[0] == 0:
        return
    half = q.shape[2] // 2
    _rotary_kernel[(q.shape[0],)](
        q, k, positions, cos_sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin.stride(0),
        q.shape[1], k.shape[1], half,
        BLOCK_HQ=pow2(q.shape[1]), BLOCK_HK=pow2(k.shape[1]), BLOCK_HALF=pow2(half),
    )  # fmt: skip
