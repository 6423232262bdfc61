"""Paged decode attention for the CPU engine, in C, compiled on first use and called through ctypes.

Torch has no op that attends through a page table, so the CPU path otherwise copies every decode
sequence's pages into a contiguous buffer (index_select) before SDPA: the whole KV context crosses
memory three times per layer per step. This kernel reads K and V in place through the page table,
once each: for one (sequence, KV head) it scores the query heads that share the head against every
context token, softmaxes, and accumulates V. Work is split over (sequence, KV head) with OpenMP.

It is a plain shared library with no torch headers, so the build takes about a second:
`cc -O3 -march=native -fopenmp -shared -fPIC`, once per machine, into `$PD_SERVE_CACHE/kernels/`
(default `~/.cache/pd-serve/kernels/`), named by a hash of the source, the flags and the CPU, and
renamed into place atomically so that concurrent processes can race safely. Without a C compiler,
or when the build fails, `load()` returns None once with a warning, and the engine keeps its
grouped-SDPA path. `PD_SERVE_CPU_NATIVE=0` turns the kernel off; the semantics are those of
`kernels.reference.paged_decode_attention_ref`, float32 only.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

ENV_VAR = "PD_SERVE_CPU_NATIVE"
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c99")

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* q [b, H, D], k_pool/v_pool [P, S, KH, D], page_table [b, pt_stride] int32, ctx [b] int32,
   out [b, H, D]; query head j reads KV head j / (H / KH). Returns 0, or 1 if out of memory. */
int paged_decode_f32(const float *q, const float *k_pool, const float *v_pool, const int32_t *page_table,
                     int64_t pt_stride, const int32_t *ctx, float *out, int64_t b, int64_t H, int64_t KH,
                     int64_t D, int64_t S, float scale, int nthreads) {
    const int64_t G = H / KH;
    int64_t max_len = 1;
    for (int64_t s = 0; s < b; s++) max_len = ctx[s] > max_len ? ctx[s] : max_len;
    int failed = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        float *scores = malloc(sizeof(float) * (size_t)(G * max_len));
        float *acc = malloc(sizeof(float) * (size_t)(G * D));
        if (!scores || !acc) failed = 1;
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < b * KH; item++) {
            if (failed) continue;
            const int64_t s = item / KH, h = item % KH, len = ctx[s];
            const int32_t *pages = page_table + s * pt_stride;
            const float *qs = q + (s * H + h * G) * D;
            for (int64_t t = 0; t < len; t++) {
                const float *kt = k_pool + (((int64_t)pages[t / S] * S + t % S) * KH + h) * D;
                for (int64_t g = 0; g < G; g++) {
                    const float *qg = qs + g * D;
                    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
                    for (int64_t d = 0; d < D; d++) dot += qg[d] * kt[d];
                    scores[g * len + t] = dot * scale;
                }
            }
            for (int64_t g = 0; g < G; g++) {
                float *sc = scores + g * len, top = -INFINITY, sum = 0.f;
                for (int64_t t = 0; t < len; t++) top = sc[t] > top ? sc[t] : top;
                for (int64_t t = 0; t < len; t++) { sc[t] = expf(sc[t] - top); sum += sc[t]; }
                for (int64_t t = 0; t < len; t++) sc[t] /= sum;
            }
            memset(acc, 0, sizeof(float) * (size_t)(G * D));
            for (int64_t t = 0; t < len; t++) {
                const float *vt = v_pool + (((int64_t)pages[t / S] * S + t % S) * KH + h) * D;
                for (int64_t g = 0; g < G; g++) {
                    const float w = scores[g * len + t];
                    float *ag = acc + g * D;
#pragma omp simd
                    for (int64_t d = 0; d < D; d++) ag[d] += w * vt[d];
                }
            }
            memcpy(out + (s * H + h * G) * D, acc, sizeof(float) * (size_t)(G * D));
        }
        free(scores);
        free(acc);
    }
    return failed;
}
"""


def _cache_dir() -> Path:
    return Path(os.environ.get("PD_SERVE_CACHE", Path.home() / ".cache" / "pd-serve")) / "kernels"


def _cpu_id() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(compiler: str) -> Path:
    key = hashlib.sha256("\0".join([_SOURCE, compiler, *_FLAGS, platform.machine(), _cpu_id()]).encode())
    target = _cache_dir() / f"paged_decode-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src, lib = Path(tmp) / "paged_decode.c", Path(tmp) / "paged_decode.so"
        src.write_text(_SOURCE)
        subprocess.run([compiler, *_FLAGS, str(src), "-o", str(lib), "-lm"], check=True, capture_output=True,
                       timeout=120)
        os.replace(lib, target)
    return target


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled library, or None (disabled, no compiler, or the build failed: logged once)."""
    if os.environ.get(ENV_VAR, "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler found: CPU decode attention uses the slower grouped-SDPA path")
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        log.warning("building the CPU decode-attention kernel failed (%s %s): using the grouped-SDPA path",
                    exc, detail.decode(errors="replace")[-500:])
        return None
    fn = lib.paged_decode_f32
    fn.restype = ctypes.c_int
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = (ptr, ptr, ptr, ptr, i64, ptr, ptr, i64, i64, i64, i64, i64, ctypes.c_float, ctypes.c_int)
    return lib


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `paged_decode_attention` runs for this device and dtype (CPU, float32) and the library loaded."""
    return device.type == "cpu" and dtype == torch.float32 and load() is not None


def paged_decode_attention(
    q: torch.Tensor,  # [b, H, D]
    k_pool: torch.Tensor,  # [P, S, KH, D]
    v_pool: torch.Tensor,  # [P, S, KH, D]
    page_table: torch.Tensor,  # [b, max_pages] int32
    context_lens: torch.Tensor,  # [b] int32, each >= 1
    scale: float,
    out: torch.Tensor | None = None,  # [b, H, D], written in full
) -> torch.Tensor:
    lib = load()
    if lib is None:
        raise RuntimeError(f"the CPU decode-attention kernel is not available (see the log; {ENV_VAR})")
    b, heads, head_dim = q.shape
    _, page_size, kv_heads, pool_dim = k_pool.shape
    _check(q, k_pool, v_pool, page_table, context_lens, heads, kv_heads, head_dim, pool_dim, b)
    if out is None:
        out = torch.empty_like(q)
    if not out.is_contiguous() or out.shape != q.shape or out.dtype != q.dtype:
        raise ValueError(f"out must be a contiguous float32 tensor of shape {tuple(q.shape)}")
    if b == 0:
        return out
    failed = lib.paged_decode_f32(
        q.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(), page_table.data_ptr(), page_table.stride(0),
        context_lens.data_ptr(), out.data_ptr(), b, heads, kv_heads, head_dim, page_size, scale,
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
    if b:  # the C code trusts these: an id or length out of range would read outside the pools
        if int(lens.min()) < 1 or int(lens.max()) > table.shape[1] * kp.shape[1]:
            raise ValueError(f"context_lens must be in [1, {table.shape[1] * kp.shape[1]}] (the page table's width)")
        if int(table.min()) < 0 or int(table.max()) >= kp.shape[0]:
            raise ValueError(f"page ids must be in [0, {kp.shape[0]})")
