"""Compile every Triton kernel for a GPU (Hopper by default) on a machine without one, and read the result.

Triton builds for a CUDA target without a GPU: its LLVM and ptxas come with the wheel. This script
drives the public wrappers (store_kv, decode and extend attention, page gather/scatter, RMSNorm,
rotary) on CPU tensors shaped like real models, catches each kernel launch before it would run, and
compiles it for the target exactly as the JIT would on that GPU: same specialization of the
arguments (16-byte alignment, divisibility by 16), same constexprs, same default options, and the
GPU code paths (bf16 tensor-core dots) that the interpreter tests never take.

For each compiled kernel it reports what the compiler decided, from the cubin itself:
registers per thread, bytes spilled to local memory, shared memory, warps, how many programs fit on
one SM (the occupancy bound from registers, shared memory and warps), and the width of every
global load and store in the SASS (128-bit loads are what a bandwidth-bound kernel needs).

This is no benchmark: it says the kernels build for the GPU and how they were compiled, not how
fast they run. `bench_kernels.py` on a lent GPU measures that.

    python3 bench/kernel_compile.py [--arch 90] [--quick] [--json FILE] [--md FILE]
"""

from __future__ import annotations

import os

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("kernel_compile.py compiles for a GPU: run it without TRITON_INTERPRET=1")

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from pd_serve.kernels import _checks, triton_decode, triton_extend, triton_kv, triton_norm  # noqa: E402
from pd_serve.kernels.testing import make_case  # noqa: E402

KERNEL_MODULES = (triton_kv, triton_decode, triton_extend, triton_norm)


@dataclass(frozen=True)
class Arch:
    """The per-SM limits that bound occupancy (CUDA programming guide, compute capability tables)."""

    capability: int
    sms: int  # SMs of the flagship part, for the decode kernel's split choice
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    smem_per_sm: int = 228 * 1024
    smem_per_block: int = 227 * 1024
    smem_reserved_per_block: int = 1024
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32


ARCHS = {
    90: Arch(90, sms=132),  # H100 SXM (H200: same SM)
    80: Arch(80, sms=108, smem_per_sm=164 * 1024, smem_per_block=163 * 1024),  # A100
}


@dataclass(frozen=True)
class Model:
    name: str
    num_heads: int
    kv_heads: int
    head_dim: int
    hidden: int


MODELS = (
    Model("llama-3-8b", 32, 8, 128, 4096),  # GQA 4
    Model("llama-2-7b", 32, 32, 128, 4096),  # GQA 1
    Model("llama-3-70b", 64, 8, 128, 8192),  # GQA 8
    Model("qwen2.5-7b", 28, 4, 128, 3584),  # GQA 7: not a power of two
    Model("tinyllama-1.1b", 32, 4, 64, 2048),  # head_dim 64, GQA 8
    Model("demo", 8, 4, 32, 256),  # the built-in demo model
)


@dataclass
class Compiled:
    kernel: str
    case: str
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    registers: int
    spill_bytes: int  # local memory per thread: spilled registers or stack arrays
    shared_bytes: int
    blocks_per_sm: int
    limited_by: str
    occupancy: float  # resident warps / max warps per SM
    loads: dict[str, int] = field(default_factory=dict)  # SASS global load widths in bits -> count
    stores: dict[str, int] = field(default_factory=dict)
    mma: dict[str, int] = field(default_factory=dict)  # tensor-core instructions: HMMA (mma.sync), HGMMA (wgmma)
    seconds: float = 0.0


def occupancy(arch: Arch, registers: int, shared: int, warps: int) -> tuple[int, str]:
    """Programs (CTAs) per SM and the resource that bounds them."""
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256  # allocated per warp in units of 256
    bounds = {
        "registers": arch.regs_per_sm // (regs_per_warp * warps),
        "warps": arch.max_warps_per_sm // warps,
        "blocks": arch.max_blocks_per_sm,
    }
    if shared:
        bounds["shared memory"] = arch.smem_per_sm // (shared + arch.smem_reserved_per_block)
    limit = min(bounds, key=lambda k: bounds[k])
    return bounds[limit], limit


_LDG = re.compile(r"\b(LDGSTS|LDG|STG|UTMALDG|UBLKCP)\b(\.[A-Z0-9_.]+)?")


def _widths(sass: str) -> tuple[dict[str, int], dict[str, int]]:
    """Global loads and stores in the SASS by width: LDG.E.128 -> '128', LDG.E.U16 -> '16', ..."""
    loads: Counter[str] = Counter()
    stores: Counter[str] = Counter()
    for op, mods in _LDG.findall(sass):
        parts = mods.split(".")
        bits = next((p.lstrip("USI") for p in parts if p.lstrip("USI") in {"8", "16", "32", "64", "128"}), "32")
        if op in ("UTMALDG", "UBLKCP"):
            bits = "tma"
        elif op == "LDGSTS":
            bits = f"async-{bits}"
        (stores if op == "STG" else loads)[bits] += 1
    return dict(loads), dict(stores)


_MMA = re.compile(r"\b(HGMMA|HMMA|IMMA|QGMMA)\b")


def _cuobjdump(args: list[str], cubin: bytes) -> str:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(tool), *args, f.name], check=True, capture_output=True, text=True).stdout


def inspect_cubin(cubin: bytes) -> tuple[int, int, str]:
    """(registers, local bytes, SASS) from the cubin."""
    usage = _cuobjdump(["-res-usage"], cubin)
    regs = re.search(r"REG:(\d+)", usage)
    local = re.search(r"LOCAL:(\d+)", usage)
    if regs is None or local is None:
        raise RuntimeError(f"cuobjdump -res-usage printed no REG/LOCAL:\n{usage}")
    return int(regs.group(1)), int(local.group(1)), _cuobjdump(["-sass"], cubin)


class Compiler:
    """Stands in for the launches of our Triton kernels: each one is compiled for `arch`, not run."""

    def __init__(self, arch: Arch) -> None:
        self.arch = arch
        self.target = GPUTarget("cuda", arch.capability, 32)
        self.backend = make_backend(self.target)
        self.case = ""
        self.results: list[Compiled] = []
        self._seen: dict[tuple[str, str], Compiled] = {}

    def compile(self, kernel: JITFunction, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Compiled:
        # What JITFunction.run does before it compiles, with this target's backend instead of the
        # active driver's (there is none here).
        kwargs = {**kwargs, "debug": False}
        binder = create_function_from_signature(kernel.signature, kernel.params, self.backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(
            self.backend, kwargs, bound, specialization, options
        )
        key = repr((signature, sorted(constexprs.items()), sorted(attrs.items()), options))
        named = {kernel.arg_names[path[0]]: value for path, value in constexprs.items() if len(path) == 1}
        cached = self._seen.get((kernel.__name__, key))
        if cached is not None:
            return cached
        start = time.perf_counter()
        out = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=self.target,
                             options=options.__dict__)  # fmt: skip
        regs, local, sass = inspect_cubin(out.asm["cubin"])
        shared, warps = int(out.metadata.shared), int(out.metadata.num_warps)
        blocks, limit = occupancy(self.arch, regs, shared, warps)
        loads, stores = _widths(sass)
        mma = dict(Counter(_MMA.findall(sass)))
        result = Compiled(
            kernel=kernel.__name__, case=self.case,
            constexprs={k: v for k, v in named.items() if not isinstance(v, str | type(None))},
            num_warps=warps, num_stages=int(out.metadata.num_stages), registers=regs, spill_bytes=local,
            shared_bytes=shared, blocks_per_sm=blocks, limited_by=limit,
            occupancy=min(1.0, blocks * warps / self.arch.max_warps_per_sm), loads=loads, stores=stores, mma=mma,
            seconds=round(time.perf_counter() - start, 2),
        )  # fmt: skip
        self._seen[(kernel.__name__, key)] = result
        self.results.append(result)
        return result

    @contextmanager
    def intercepting(self) -> Iterator[None]:
        """Route our kernels' launches here, let the wrappers take CPU tensors, and size splits for the GPU."""
        kernels = [
            obj for m in KERNEL_MODULES for obj in vars(m).values()
            if isinstance(obj, JITFunction) and obj.__module__ == m.__name__
        ]  # fmt: skip

        def launcher(kernel: JITFunction) -> Callable[..., None]:
            def run(*args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
                self.compile(kernel, args, kwargs)

            return run

        saved = (_checks.check_devices, triton_decode._sm_count)
        for k in kernels:
            k.run = launcher(k)  # type: ignore[method-assign]
        _checks.check_devices = lambda tensors, interpreted: None
        triton_decode._sm_count = lambda device: self.arch.sms  # type: ignore[assignment]
        try:
            yield
        finally:
            for k in kernels:
                del k.run
            _checks.check_devices, triton_decode._sm_count = saved  # type: ignore[assignment]


def drive(compiler: Compiler, model: Model, dtype: torch.dtype, page_size: int) -> None:
    """Call every wrapper once per launch shape the engine produces for this model."""
    h, kvh, d = model.num_heads, model.kv_heads, model.head_dim
    tag = f"{model.name} {str(dtype).removeprefix('torch.')} page {page_size}"

    compiler.case = f"{tag}: decode batch 64 x 4096"  # the target size: one split per sequence
    case = make_case([4096] * 64, [1] * 64, h, kvh, d, page_size, dtype)
    args = (case.q, case.k_pool, case.v_pool, case.page_table, case.context_lens, case.scale)
    triton_decode.paged_decode_attention_triton(*args)
    compiler.case = f"{tag}: decode batch 1 x 4096"  # few sequences: split-K and the combine kernel
    case = make_case([4096], [1], h, kvh, d, page_size, dtype)
    triton_decode.paged_decode_attention_triton(
        case.q, case.k_pool, case.v_pool, case.page_table, case.context_lens, case.scale
    )

    compiler.case = f"{tag}: extend 2 x 300 new on 200 cached"
    case = make_case([500, 500], [300, 300], h, kvh, d, page_size, dtype)
    triton_extend.extend_attention_triton(
        case.q, case.k_pool, case.v_pool, case.page_table, case.query_start, case.context_lens, case.scale
    )

    compiler.case = f"{tag}: store_kv 37 tokens"
    k = torch.randn(37, kvh, d, dtype=dtype)
    triton_kv.store_kv_triton(case.k_pool, case.v_pool, k, k.clone(), torch.arange(37, dtype=torch.int64))

    compiler.case = f"{tag}: gather/scatter 64 pages x 2 layers"
    pools = [torch.empty_like(case.k_pool) for _ in range(4)]
    ids = torch.arange(64, dtype=torch.int64)
    staging = torch.empty(len(pools), 64, *case.k_pool.shape[1:], dtype=dtype)
    triton_kv.gather_pages_triton(pools, ids, staging)
    triton_kv.scatter_pages_triton(staging, pools, ids)
    compiler.case = f"{tag}: gather from a pool one element off 16-byte alignment (fallback)"
    flat = torch.empty(case.k_pool.numel() + 1, dtype=dtype)
    triton_kv.gather_pages_triton([flat[1:].view(case.k_pool.shape)], ids, staging[:1])

    compiler.case = f"{tag}: rms_norm 37 x {model.hidden}, rotary"
    x = torch.randn(37, model.hidden, dtype=dtype)
    weight = torch.ones(model.hidden, dtype=dtype)
    triton_norm.rms_norm_triton(x, weight, 1e-5, None)
    triton_norm.rms_norm_triton(x, weight, 1e-5, x.clone())
    q, kk = torch.randn(37, h, d, dtype=dtype), torch.randn(37, kvh, d, dtype=dtype)
    cos_sin = torch.randn(4096, d, dtype=torch.float32)
    triton_norm.rotary_triton(q, kk, torch.arange(37, dtype=torch.int64), cos_sin)


def run(arch: Arch, quick: bool) -> list[Compiled]:
    compiler = Compiler(arch)
    torch.manual_seed(0)
    plan: list[tuple[Model, torch.dtype, int]]
    if quick:  # CI: the most common GQA shape and the awkward one, bf16, default page size
        plan = [(MODELS[0], torch.bfloat16, 16), (MODELS[3], torch.bfloat16, 16)]
    else:
        plan = [(m, dt, 16) for m in MODELS for dt in (torch.bfloat16, torch.float16)]
        plan += [(MODELS[0], torch.float32, 16), (MODELS[0], torch.bfloat16, 1), (MODELS[0], torch.bfloat16, 32)]
    with compiler.intercepting():
        for model, dtype, page_size in plan:
            drive(compiler, model, dtype, page_size)
    return compiler.results


def markdown(arch: Arch, results: list[Compiled]) -> str:
    lines = [
        f"# Triton kernels compiled for sm_{arch.capability} (no GPU: `python3 bench/kernel_compile.py`)",
        "",
        f"triton {triton.__version__}, torch {torch.__version__}. One row per distinct compilation; "
        "'case' is the first launch that produced it. Occupancy: resident warps over "
        f"{arch.max_warps_per_sm} per SM, from registers, shared memory and warps per program.",
        "",
        "| kernel | case | constexprs | warps | stages | regs | spill B | smem KiB | CTAs/SM (bound) "
        "| occupancy | global loads (bits: n) | stores | tensor-core ops |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- | --- | --- |",
    ]
    for r in results:
        consts = ", ".join(f"{k}={v}" for k, v in r.constexprs.items())
        loads = ", ".join(f"{k}: {v}" for k, v in sorted(r.loads.items()))
        stores = ", ".join(f"{k}: {v}" for k, v in sorted(r.stores.items()))
        mma = ", ".join(f"{k}: {v}" for k, v in sorted(r.mma.items())) or "-"
        lines.append(
            f"| {r.kernel} | {r.case} | {consts} | {r.num_warps} | {r.num_stages} | {r.registers} "
            f"| {r.spill_bytes} | {r.shared_bytes / 1024:.1f} | {r.blocks_per_sm} ({r.limited_by}) "
            f"| {r.occupancy:.0%} | {loads} | {stores} | {mma} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, choices=sorted(ARCHS), default=90, help="compute capability")
    parser.add_argument("--quick", action="store_true", help="two models, bf16 only (what the tests compile)")
    parser.add_argument("--json", help="write the results as JSON to this file")
    parser.add_argument("--md", help="write the results as a markdown table to this file")
    args = parser.parse_args()
    arch = ARCHS[args.arch]
    results = run(arch, args.quick)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=1) + "\n")
    text = markdown(arch, results)
    if args.md:
        Path(args.md).write_text(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
