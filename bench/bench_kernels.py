"""Kernel benchmark: each Triton kernel against its torch reference, printed as one JSON object.

On a GPU it measures decode attention's achieved bandwidth and prefill (extend) attention's TFLOP/s
at the issue's sizes, and gather/scatter GB/s, each against a device-to-device copy timed in the
same run (targets on H100/H200: decode >= 70% of copy bandwidth at batch 64, context 4096;
gather/scatter >= 80%). Timings are medians of triton.testing.do_bench (CUDA events). On a GPU it
also sweeps decode's context block and the page copy's block size, as fractions of the copy.

Without a GPU the kernels can only run under TRITON_INTERPRET=1 at toy sizes: the JSON then says
so, and its numbers only show that the script and the kernels run, not how fast they would be.

    python3 bench/bench_kernels.py [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated, at import

from pd_serve.kernels import reference  # noqa: E402
from pd_serve.kernels.testing import make_case  # noqa: E402


@dataclass(frozen=True)
class Sizes:
    batch: int
    context: int
    num_heads: int
    kv_heads: int
    head_dim: int
    page_size: int
    prefill_seqs: int
    prefill_len: int
    layers: int
    transfer_pages: int
    copy_bytes: int


GPU_SIZES = Sizes(64, 4096, 32, 8, 128, 16, 4, 2048, 32, 512, 1 << 30)
CPU_SIZES = Sizes(2, 40, 8, 2, 64, 16, 1, 24, 2, 4, 1 << 20)


def time_ms(fn: Callable[[], Any]) -> float:
    """Median milliseconds per call."""
    if ON_GPU:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))
    fn()
    samples = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def bench_copy(s: Sizes, device: str) -> dict[str, float]:
    src = torch.randn(s.copy_bytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    return {"ms": ms, "GB/s": 2 * s.copy_bytes / ms / 1e6}


def bench_decode(s: Sizes, device: str) -> dict[str, float]:
    from pd_serve.kernels.triton_decode import paged_decode_attention_triton

    case = make_case([s.context] * s.batch, [1] * s.batch, s.num_heads, s.kv_heads, s.head_dim, s.page_size,
                     torch.bfloat16, device)  # fmt: skip
    args = (case.q, case.k_pool, case.v_pool, case.page_table, case.context_lens, case.scale)
    kv_bytes = 2 * s.batch * s.context * s.kv_heads * s.head_dim * case.k_pool.element_size()
    triton_ms = time_ms(lambda: paged_decode_attention_triton(*args))
    ref_ms = time_ms(lambda: reference.paged_decode_attention_ref(*args))
    return {"triton_ms": triton_ms, "torch_ms": ref_ms, "triton_GB/s": kv_bytes / triton_ms / 1e6,
            "torch_GB/s": kv_bytes / ref_ms / 1e6}  # fmt: skip


def bench_extend(s: Sizes, device: str) -> dict[str, float]:
    from pd_serve.kernels.triton_extend import extend_attention_triton

    lens = [s.prefill_len] * s.prefill_seqs
    case = make_case(lens, lens, s.num_heads, s.kv_heads, s.head_dim, s.page_size, torch.bfloat16, device)
    args = (
        case.q,
        case.k_pool,
        case.v_pool,
        case.page_table,
        case.query_start,
        case.context_lens,
        case.scale,
    )
    # causal: each query row attends to (row + 1) keys; QK^T and PV are 2 flops per multiply-add each
    flops = 4 * s.num_heads * s.head_dim * s.prefill_seqs * s.prefill_len * (s.prefill_len + 1) / 2
    triton_ms = time_ms(lambda: extend_attention_triton(*args))
    ref_ms = time_ms(lambda: reference.extend_attention_ref(*args))
    return {"triton_ms": triton_ms, "torch_ms": ref_ms, "triton_TFLOP/s": flops / triton_ms / 1e9,
            "torch_TFLOP/s": flops / ref_ms / 1e9}  # fmt: skip


def bench_pages(s: Sizes, device: str) -> dict[str, float]:
    from pd_serve.kernels.triton_kv import gather_pages_triton, scatter_pages_triton

    shape = (4 * s.transfer_pages, s.page_size, s.kv_heads, s.head_dim)
    pools = [torch.randn(shape, dtype=torch.bfloat16, device=device) for _ in range(2 * s.layers)]
    ids = torch.randperm(shape[0], device=device)[: s.transfer_pages]
    staging = torch.empty(len(pools), s.transfer_pages, *shape[1:], dtype=torch.bfloat16, device=device)
    moved = 2 * staging.numel() * staging.element_size()  # read once, written once
    out: dict[str, float] = {}
    for name, fn in {
        "gather_triton": lambda: gather_pages_triton(pools, ids, staging),
        "gather_torch": lambda: reference.gather_pages_ref(pools, ids, staging),
        "scatter_triton": lambda: scatter_pages_triton(staging, pools, ids),
        "scatter_torch": lambda: reference.scatter_pages_ref(staging, pools, ids),
    }.items():
        ms = time_ms(fn)
        out[f"{name}_ms"], out[f"{name}_GB/s"] = ms, moved / ms / 1e6
    return out


def bench_sweeps(s: Sizes, device: str, copy_gbs: float) -> dict[str, dict[str, float]]:
    """Fraction of copy bandwidth per block size, so that one GPU run says which to keep:
    decode attention's context tokens per loop step, and the page copy's elements per program."""
    from pd_serve.kernels.triton_decode import decode_into
    from pd_serve.kernels.triton_kv import _page_copy

    case = make_case([s.context] * s.batch, [1] * s.batch, s.num_heads, s.kv_heads, s.head_dim, s.page_size,
                     torch.bfloat16, device)  # fmt: skip
    kv_bytes = 2 * s.batch * s.context * s.kv_heads * s.head_dim * case.k_pool.element_size()
    out = torch.empty_like(case.q)
    decode: dict[str, float] = {}
    for block_n in (32, 64, 128):
        ms = time_ms(lambda b=block_n: decode_into(case.q, case.k_pool, case.v_pool, case.page_table,
                                                   case.context_lens, case.scale, out, 1, b))  # fmt: skip
        decode[f"block_n={block_n}"] = kv_bytes / ms / 1e6 / copy_gbs
    shape = (4 * s.transfer_pages, s.page_size, s.kv_heads, s.head_dim)
    pools = [torch.randn(shape, dtype=torch.bfloat16, device=device) for _ in range(2 * s.layers)]
    ids = torch.randperm(shape[0], device=device)[: s.transfer_pages]
    staging = torch.empty(len(pools), s.transfer_pages, *shape[1:], dtype=torch.bfloat16, device=device)
    moved = 2 * staging.numel() * staging.element_size()
    gather: dict[str, float] = {}
    for block in (1024, 2048, 4096, 8192):
        ms = time_ms(lambda b=block: _page_copy(pools, ids, staging, True, b))
        gather[f"block={block}"] = moved / ms / 1e6 / copy_gbs
    return {"decode_fraction_of_copy": decode, "gather_fraction_of_copy": gather}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", help="also write the JSON to this file")
    args = parser.parse_args()
    device, sizes = ("cuda", GPU_SIZES) if ON_GPU else ("cpu", CPU_SIZES)
    torch.manual_seed(0)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if ON_GPU else "cpu (Triton interpreter)",
        "note": "GPU timings" if ON_GPU else "no GPU: interpreter at toy sizes; real numbers need a GPU",
        "sizes": sizes.__dict__,
        "copy": bench_copy(sizes, device),
        "decode_attention": bench_decode(sizes, device),
        "extend_attention": bench_extend(sizes, device),
        "pages": bench_pages(sizes, device),
    }
    copy_bw = result["copy"]["GB/s"]
    result["fraction_of_copy"] = {
        "decode_attention": result["decode_attention"]["triton_GB/s"] / copy_bw,
        "gather": result["pages"]["gather_triton_GB/s"] / copy_bw,
        "scatter": result["pages"]["scatter_triton_GB/s"] / copy_bw,
    }
    if ON_GPU:  # under the interpreter the sweeps would take minutes and mean nothing
        result["sweeps"] = bench_sweeps(sizes, device, copy_bw)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
