"""The decoder layer's dense ops for the CPU engine in C: linear for few rows, RMSNorm, q/k/v split
with rotary, SiLU-mul, and the KV store.

Decode at small batch reads every weight once per step, so it is bound by memory bandwidth and by
the per-op cost of torch's dispatch (30 layers x ~50 small ops). `linear` streams the weight rows
once, split over the threads, the dot products of up to `LINEAR_MAX_ROWS` rows of x kept in vector
registers: as fast as torch's GEMV at one row, faster at 2-8 rows (torch's GEMM re-reads the
weights there), slower above (torch's GEMM runs then). The elementwise ops are one pass and one
call each instead of torch's five to twenty. Float32, contiguous, CPU only; the semantics are those
of the references in `reference.py` (and `F.linear`, `silu(gate) * up`), with float32 sums in
another order. Built by `cpu_build` (None from `load()` where it cannot be: callers keep torch).

Every wrapper checks devices, dtypes, shapes and contiguity before the C code runs; index values
(positions, slots) are checked by the caller once per step, not per layer.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from pd_serve.kernels import cpu_build

LINEAR_MAX_ROWS = 8  # rows of x up to which `linear` beats torch's GEMM (measured on 2 cores, AVX-512)

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>

#define VW 16
typedef float vf __attribute__((vector_size(VW * 4), aligned(4)));

static inline float hsum(vf v) { float s = 0.f; for (int i = 0; i < VW; i++) s += v[i]; return s; }
static inline vf vload(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }

/* y[i][j] = x[i] . w[j] for MB rows of x (stride K) and NB rows of w, into y (row stride N) */
static inline void tile(const float *restrict x, const float *restrict w, float *restrict y, int64_t K,
                        int64_t N, const int MB, const int NB) {
    vf acc[4][4];
    for (int i = 0; i < MB; i++) for (int j = 0; j < NB; j++) acc[i][j] = (vf){0};
    int64_t k = 0;
    for (; k + VW <= K; k += VW) {
        vf wv[4];
        for (int j = 0; j < NB; j++) wv[j] = vload(w + j * K + k);
        for (int i = 0; i < MB; i++) {
            const vf xv = vload(x + i * K + k);
            for (int j = 0; j < NB; j++) acc[i][j] += xv * wv[j];
        }
    }
    for (int i = 0; i < MB; i++)
        for (int j = 0; j < NB; j++) {
            float s = hsum(acc[i][j]);
            for (int64_t t = k; t < K; t++) s += x[i * K + t] * w[j * K + t];
            y[i * N + j] = s;
        }
}

static inline void rows(const float *x, const float *w, float *y, int64_t K, int64_t N, int64_t M, const int NB) {
    int64_t i = 0;
    for (; i + 4 <= M; i += 4) tile(x + i * K, w, y + i * N, K, N, 4, NB);
    for (; i < M; i++) tile(x + i * K, w, y + i * N, K, N, 1, NB);
}

/* y [M, N] = x [M, K] @ w [N, K]^T (+ bias [N]); the threads split w's rows */
void linear_f32(const float *x, const float *w, const float *bias, float *y, int64_t M, int64_t N, int64_t K,
                int nthreads) {
    const int64_t blocks = (N + 3) / 4;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t n = b * 4;
        if (n + 4 <= N) rows(x, w + n * K, y + n, K, N, M, 4);
        else for (int64_t j = n; j < N; j++) rows(x, w + j * K, y + j, K, N, M, 1);
    }
    if (bias)
        for (int64_t i = 0; i < M; i++) for (int64_t j = 0; j < N; j++) y[i * N + j] += bias[j];
}

/* residual NULL: out = norm(x) * w. Else residual += x, then out = norm(residual) * w. */
void rms_norm_f32(const float *x, float *residual, const float *w, float *out, int64_t M, int64_t H, float eps,
                  int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (M >= 16)
    for (int64_t i = 0; i < M; i++) {
        const float *xi = x + i * H;
        float *src = (float *)xi, ss = 0.f;
        if (residual) {
            src = residual + i * H;
            for (int64_t j = 0; j < H; j++) src[j] += xi[j];
        }
#pragma omp simd reduction(+ : ss)
        for (int64_t j = 0; j < H; j++) ss += src[j] * src[j];
        const float r = 1.f / sqrtf(ss / (float)H + eps);
        for (int64_t j = 0; j < H; j++) out[i * H + j] = w[j] * (src[j] * r);
    }
}

/* neox rotary of x [D] at one position into y [D]; c: cos [D / 2] then sin [D / 2] */
static inline void rotate(const float *x, float *y, const float *c, int64_t D) {
    const int64_t half = D / 2;
    const float *s = c + half;
    for (int64_t d = 0; d < half; d++) {
        const float x1 = x[d], x2 = x[d + half];
        y[d] = x1 * c[d] - x2 * s[d];
        y[d + half] = x2 * c[d] + x1 * s[d];
    }
}

/* qkv [T, (H + 2 KH) D] -> q [T, H, D] and k [T, KH, D] rotated, v [T, KH, D] copied */
void qkv_rotary_f32(const float *qkv, const int64_t *pos, const float *cos_sin, float *q, float *k, float *v,
                    int64_t T, int64_t H, int64_t KH, int64_t D) {
    const int64_t row = (H + 2 * KH) * D;
    for (int64_t i = 0; i < T; i++) {
        const float *src = qkv + i * row, *c = cos_sin + pos[i] * D;
        for (int64_t h = 0; h < H; h++) rotate(src + h * D, q + (i * H + h) * D, c, D);
        for (int64_t h = 0; h < KH; h++) rotate(src + (H + h) * D, k + (i * KH + h) * D, c, D);
        memcpy(v + i * KH * D, src + (H + KH) * D, sizeof(float) * (size_t)(KH * D));
    }
}

/* each token's k and v rows [row] into the pools' flat slots: slot = page * page_size + offset */
void store_kv_f32(float *k_pool, float *v_pool, const float *k, const float *v, const int64_t *slots, int64_t T,
                  int64_t row) {
    for (int64_t i = 0; i < T; i++) {
        memcpy(k_pool + slots[i] * row, k + i * row, sizeof(float) * (size_t)row);
        memcpy(v_pool + slots[i] * row, v + i * row, sizeof(float) * (size_t)row);
    }
}

/* out [M, I] = silu(gate_up[:, :I]) * gate_up[:, I:] */
void silu_mul_f32(const float *gu, float *out, int64_t M, int64_t I, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (M >= 16)
    for (int64_t i = 0; i < M; i++)
        for (int64_t j = 0; j < I; j++) {
            const float g = gu[i * 2 * I + j];
            out[i * I + j] = g / (1.f + expf(-g)) * gu[i * 2 * I + I + j];
        }
}
"""


@functools.cache
def load() -> ctypes.CDLL | None:
    """The library, or None (disabled by PD_SERVE_CPU_NATIVE=0, no compiler, or the build failed)."""
    lib = cpu_build.load("cpu_ops", _SOURCE, ("-std=gnu99", "-ffp-contract=fast"))
    if lib is None:
        return None
    ptr, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    signatures = {
        "linear_f32": (ptr, ptr, ptr, ptr, i64, i64, i64, i32),
        "rms_norm_f32": (ptr, ptr, ptr, ptr, i64, i64, f32, i32),
        "qkv_rotary_f32": (ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64),
        "silu_mul_f32": (ptr, ptr, i64, i64, i32),
        "store_kv_f32": (ptr, ptr, ptr, ptr, ptr, i64, i64),
    }
    for name, args in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, None
    return lib


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype == torch.float32 and load() is not None


def _lib() -> ctypes.CDLL:
    lib = load()
    if lib is None:
        raise RuntimeError(f"the CPU kernels are not available (see the log; {cpu_build.ENV_VAR})")
    return lib


def _require(**tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and (t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous float32 CPU tensor, got {t.dtype} on {t.device}")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T (+ bias [N]) -> [M, N], as F.linear."""
    _require(x=x, weight=weight, bias=bias)
    (m, k), n = x.shape, weight.shape[0]
    if weight.shape != (n, k) or (bias is not None and bias.shape != (n,)):
        raise ValueError(f"shapes do not match: x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    y = torch.empty(m, n)
    _lib().linear_f32(x.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(),
                      m, n, k, torch.get_num_threads())
    return y


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """As `reference.rms_norm_ref`, except that a given `residual` is updated in place (and returned)."""
    _require(x=x, weight=weight, residual=residual)
    m, h = x.shape
    if weight.shape != (h,) or (residual is not None and residual.shape != x.shape):
        raise ValueError(f"shapes do not match: x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    out = torch.empty_like(x)
    _lib().rms_norm_f32(x.data_ptr(), None if residual is None else residual.data_ptr(), weight.data_ptr(),
                        out.data_ptr(), m, h, eps, torch.get_num_threads())
    return out, x if residual is None else residual


def qkv_rotary(
    qkv: torch.Tensor,  # [T, (H + 2 * KH) * D]: q, k and v of each token side by side
    num_heads: int,
    num_kv_heads: int,
    positions: torch.Tensor,  # [T] int64, each < len(cos_sin): the caller checks (once per forward)
    cos_sin: torch.Tensor,  # [max_positions, D]: cos in the first half, sin in the second
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> q [T, H, D] and k [T, KH, D] rotated as `reference.rotary_ref` does, v [T, KH, D]; all contiguous."""
    _require(qkv=qkv, cos_sin=cos_sin)
    t, d = qkv.shape[0], cos_sin.shape[1]
    if qkv.shape[1] != (num_heads + 2 * num_kv_heads) * d or positions.shape != (t,):
        raise ValueError(f"shapes do not match: qkv {tuple(qkv.shape)}, positions {tuple(positions.shape)}, "
                         f"cos_sin {tuple(cos_sin.shape)}, {num_heads} heads and {num_kv_heads} KV heads")
    if positions.dtype != torch.int64 or not positions.is_contiguous() or positions.device.type != "cpu":
        raise ValueError(f"positions must be a contiguous int64 CPU tensor, got {positions.dtype}")
    q, k, v = torch.empty(t, num_heads, d), torch.empty(t, num_kv_heads, d), torch.empty(t, num_kv_heads, d)
    _lib().qkv_rotary_f32(qkv.data_ptr(), positions.data_ptr(), cos_sin.data_ptr(), q.data_ptr(), k.data_ptr(),
                          v.data_ptr(), t, num_heads, num_kv_heads, d)
    return q, k, v


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[M, 2I] -> silu(gate_up[:, :I]) * gate_up[:, I:], [M, I]."""
    _require(gate_up=gate_up)
    m, two_i = gate_up.shape
    out = torch.empty(m, two_i // 2)
    _lib().silu_mul_f32(gate_up.data_ptr(), out.data_ptr(), m, two_i // 2, torch.get_num_threads())
    return out


def store_kv(
    k_pool: torch.Tensor,  # [num_pages, page_size, kv_heads, head_dim]
    v_pool: torch.Tensor,  # [num_pages, page_size, kv_heads, head_dim]
    k: torch.Tensor,  # [T, kv_heads, head_dim]
    v: torch.Tensor,  # [T, kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [T] int64, each in [0, num_pages * page_size): the caller checks (once per step)
) -> None:
    """As `reference.store_kv_ref` (torch's index_copy_ costs ~40 us a call here, this ~1 us)."""
    _require(k_pool=k_pool, v_pool=v_pool, k=k, v=v)
    row = k_pool.shape[2] * k_pool.shape[3]
    t = k.shape[0]
    if v_pool.shape != k_pool.shape or k.shape != v.shape or k[0].numel() != row or slot_mapping.shape != (t,):
        raise ValueError(f"shapes do not match: pools {tuple(k_pool.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if slot_mapping.dtype != torch.int64 or not slot_mapping.is_contiguous() or slot_mapping.device.type != "cpu":
        raise ValueError(f"slot_mapping must be a contiguous int64 CPU tensor, got {slot_mapping.dtype}")
    _lib().store_kv_f32(k_pool.data_ptr(), v_pool.data_ptr(), k.data_ptr(), v.data_ptr(), slot_mapping.data_ptr(), t, row)
