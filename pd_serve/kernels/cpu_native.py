"""Paged decode attention for the CPU engine, in C, compiled on first use and called through ctypes.

Torch has no op that attends through a page table, so the CPU path otherwise copies every decode
sequence's pages into a contiguous buffer (index_select) before SDPA: the whole KV context crosses
memory three times per layer per step. This kernel reads K and V in place through the page table,
once each: for one (sequence, KV head) it scores the query heads that share the head against every
context token, softmaxes (with an inlined exp, so that the loop vectorizes: a quarter less time at
batch 16 than libm's expf), and accumulates V. Work is split over (sequence, KV head) with OpenMP
(the library links the libgomp torch has loaded, so the two share one thread pool).

It is built by `cpu_build` once per machine and model shape (head_dim and the query heads per KV
head are compile-time constants). Without a C compiler, or when the build fails, `load()` returns
None once with a warning, and the engine keeps its grouped-SDPA path. `PD_SERVE_CPU_NATIVE=0` turns
the kernel off; the semantics are those of `kernels.reference.paged_decode_attention_ref`, float32
only. The page table and lengths are checked against the pools on every call unless the caller says
it checked them (`check_tables`, once per step for all layers).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from pd_serve.kernels import cpu_build

ENV_VAR = cpu_build.ENV_VAR

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* e^x for x in [-80, 0] (Cephes' expf: range reduction by ln 2, degree-6 polynomial, about 1 ulp);
   plain arithmetic, so the softmax loop vectorizes where a call to libm's expf would not */
static inline float exp_neg(float x) {
    const float shifted = x * 1.44269504088896341f + 12582912.f;  /* round(x / ln 2) + 1.5 * 2^23 */
    const float n = shifted - 12582912.f;
    int32_t bits;
    memcpy(&bits, &shifted, sizeof bits);
    const int32_t e = bits - 0x4B400000 + 127;  /* n + 127: the exponent of 2^n, in [11, 127] here */
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    const int32_t pow2 = e << 23;
    float scale2;
    memcpy(&scale2, &pow2, sizeof scale2);
    return p * scale2;
}

/* HEAD_DIM and GROUP (query heads per KV head) are compile-time constants: one build per model shape. */
int paged_decode_f32(const float *q, const float *k_pool, const float *v_pool, const int32_t *page_table,
                     int64_t pt_stride, const int32_t *ctx, float *out, int64_t b, int64_t KH, int64_t S,
                     float scale, int nthreads) {
    const int64_t H = KH * GROUP, row = KH * HEAD_DIM;
    int64_t max_len = 1;
    for (int64_t s = 0; s < b; s++) max_len = ctx[s] > max_len ? ctx[s] : max_len;
    int failed = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        float *scores = malloc(sizeof(float) * (size_t)(GROUP * max_len));
        if (!scores) failed = 1;
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < b * KH; item++) {
            if (failed) continue;
            const int64_t s = item / KH, h = item % KH, len = ctx[s], npages = (len + S - 1) / S;
            const int32_t *pages = page_table + s * pt_stride;
            float qs[GROUP][HEAD_DIM], acc[GROUP][HEAD_DIM], top[GROUP], sum[GROUP];
            for (int g = 0; g < GROUP; g++) {
                for (int d = 0; d < HEAD_DIM; d++) { qs[g][d] = q[(s * H + h * GROUP + g) * HEAD_DIM + d] * scale; acc[g][d] = 0.f; }
                top[g] = -INFINITY; sum[g] = 0.f;
            }
            for (int64_t p = 0, t = 0; p < npages; p++) {
                const float *kpage = k_pool + (int64_t)pages[p] * S * row + h * HEAD_DIM;
                const int64_t n = len - p * S < S ? len - p * S : S;
                for (int64_t o = 0; o < n; o++, t++) {
                    const float *kt = kpage + o * row;
                    for (int g = 0; g < GROUP; g++) {
                        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
                        for (int d = 0; d < HEAD_DIM; d++) dot += qs[g][d] * kt[d];
                        scores[g * len + t] = dot;
                        top[g] = dot > top[g] ? dot : top[g];
                    }
                }
            }
            for (int g = 0; g < GROUP; g++) {
                float *sc = scores + g * len, total = 0.f;
                const float m = top[g];
#pragma omp simd reduction(+ : total)
                for (int64_t t = 0; t < len; t++) {
                    const float x = sc[t] - m;
                    sc[t] = x < -80.f ? 0.f : exp_neg(x);  /* below e^-80 the weight is 0: no denormals */
                    total += sc[t];
                }
                sum[g] = total;
            }
            for (int64_t p = 0, t = 0; p < npages; p++) {
                const float *vpage = v_pool + (int64_t)pages[p] * S * row + h * HEAD_DIM;
                const int64_t n = len - p * S < S ? len - p * S : S;
                for (int64_t o = 0; o < n; o++, t++) {
                    const float *vt = vpage + o * row;
                    for (int g = 0; g < GROUP; g++) {
                        const float w = scores[g * len + t];
#pragma omp simd
                        for (int d = 0; d < HEAD_DIM; d++) acc[g][d] += w * vt[d];
                    }
                }
            }
            for (int g = 0; g < GROUP; g++) {
                float *o = out + (s * H + h * GROUP + g) * HEAD_DIM;
                const float inv = 1.f / sum[g];
                for (int d = 0; d < HEAD_DIM; d++) o[d] = acc[g][d] * inv;
            }
        }
        free(scores);
    }
    return failed;
}
"""


@functools.cache
def load(head_dim: int, group: int) -> ctypes.CDLL | None:
    """The library for this head_dim and query heads per KV head (compile-time constants, so the
    loops unroll and the accumulators stay in registers), or None (disabled, no compiler, or the
    build failed: logged once per shape)."""
    lib = cpu_build.load(f"paged_decode-d{head_dim}-g{group}", _SOURCE, (f"-DHEAD_DIM={head_dim}", f"-DGROUP={group}"))
    if lib is None:
        return None
    fn = lib.paged_decode_f32
    fn.restype = ctypes.c_int
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = (ptr, ptr, ptr, ptr, i64, ptr, ptr, i64, i64, i64, ctypes.c_float, ctypes.c_int)
    return lib


def supports(device: torch.device, dtype: torch.dtype, head_dim: int, group: int) -> bool:
    """Whether `paged_decode_attention` runs here (CPU, float32) and its library loaded for this shape."""
    return device.type == "cpu" and dtype == torch.float32 and load(head_dim, group) is not None


def paged_decode_attention(
    q: torch.Tensor,  # [b, H, D]
    k_pool: torch.Tensor,  # [P, S, KH, D]
    v_pool: torch.Tensor,  # [P, S, KH, D]
    page_table: torch.Tensor,  # [b, max_pages] int32
    context_lens: torch.Tensor,  # [b] int32, each >= 1
    scale: float,
    out: torch.Tensor | None = None,  # [b, H, D], written in full
    tables_checked: bool = False,  # check_tables(page_table, context_lens, k_pool) already passed
) -> torch.Tensor:
    b, heads, head_dim = q.shape
    _, page_size, kv_heads, pool_dim = k_pool.shape
    _check(q, k_pool, v_pool, page_table, context_lens, heads, kv_heads, head_dim, pool_dim, b)
    if not tables_checked:
        check_tables(page_table, context_lens, k_pool)
    lib = load(head_dim, heads // kv_heads)
    if lib is None:
        raise RuntimeError(f"the CPU decode-attention kernel is not available (see the log; {ENV_VAR})")
    if out is None:
        out = torch.empty_like(q)
    if not out.is_contiguous() or out.shape != q.shape or out.dtype != q.dtype:
        raise ValueError(f"out must be a contiguous float32 tensor of shape {tuple(q.shape)}")
    if b == 0:
        return out
    failed = lib.paged_decode_f32(
        q.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(), page_table.data_ptr(), page_table.stride(0),
        context_lens.data_ptr(), out.data_ptr(), b, kv_heads, page_size, scale,
        torch.get_num_threads(),
    )
    if failed:
        raise MemoryError("the CPU decode-attention kernel could not allocate its score buffer")
    return out


def _check(q: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor, table: torch.Tensor, lens: torch.Tensor,
           heads: int, kv_heads: int, head_dim: int, pool_dim: int, b: int) -> None:
    for name, t in (("q", q), ("k_pool", kp), ("v_pool", vp), ("page_table", table), ("context_lens", lens)):
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous CPU tensor")
    if q.dtype != torch.float32 or kp.dtype != torch.float32 or vp.dtype != torch.float32:
        raise ValueError(f"float32 only: q {q.dtype}, k_pool {kp.dtype}, v_pool {vp.dtype}")
    if table.dtype != torch.int32 or lens.dtype != torch.int32:
        raise ValueError(f"page_table and context_lens must be int32, got {table.dtype} and {lens.dtype}")
    if kp.shape != vp.shape or pool_dim != head_dim or heads % kv_heads:
        raise ValueError(f"shapes do not match: q {tuple(q.shape)}, k_pool {tuple(kp.shape)}, v_pool {tuple(vp.shape)}")
    if table.dim() != 2 or table.shape[0] != b or lens.shape != (b,):
        raise ValueError(f"page_table {tuple(table.shape)} and context_lens {tuple(lens.shape)} need {b} rows")


def check_tables(table: torch.Tensor, lens: torch.Tensor, pool: torch.Tensor) -> None:
    """The values the C code trusts: an id or a length out of range would read outside the pools."""
    if not lens.numel():
        return
    if int(lens.min()) < 1 or int(lens.max()) > table.shape[1] * pool.shape[1]:
        raise ValueError(f"context_lens must be in [1, {table.shape[1] * pool.shape[1]}] (the page table's width)")
    if int(table.min()) < 0 or int(table.max()) >= pool.shape[0]:
        raise ValueError(f"page ids must be in [0, {pool.shape[0]})")
