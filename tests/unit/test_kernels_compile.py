"""The Triton kernels compile for Hopper (sm_90) without a GPU, and the compiler did what the design needs.

Runs bench/kernel_compile.py --quick in a child process (the kernel tests of this suite import the
kernels for the interpreter; this needs them built for CUDA) and reads its JSON: every kernel
built through its public wrapper, nothing spilled, shared memory within one SM's, the bandwidth-
critical loads and stores 128 bits wide, attention on tensor cores. Static facts of the compiled
code, no timings: bench_kernels.py on a GPU measures speed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
KERNELS = {
    "_store_kv_kernel",
    "_decode_split_kernel",
    "_combine_kernel",
    "_extend_kernel",
    "_page_copy_kernel",
    "_rms_norm_kernel",
    "_rotary_kernel",
}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("sm90") / "kernels.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "kernel_compile.py"), "--quick", "--arch", "90", "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    results: list[dict[str, Any]] = json.loads(out.read_text())
    return results


def of(results: list[dict[str, Any]], kernel: str) -> list[dict[str, Any]]:
    rows = [r for r in results if r["kernel"] == kernel]
    assert rows, f"{kernel} was never compiled"
    return rows


def test_every_kernel_builds_without_spills_within_shared_memory(compiled: list[dict[str, Any]]) -> None:
    assert {r["kernel"] for r in compiled} == KERNELS
    for r in compiled:
        where = f"{r['kernel']} ({r['case']})"
        assert r["spill_bytes"] == 0, f"{where}: {r['spill_bytes']} bytes spilled to local memory"
        assert 0 < r["registers"] <= 255, where
        assert r["shared_bytes"] <= 227 * 1024, f"{where}: {r['shared_bytes']} bytes of shared memory"
        assert r["blocks_per_sm"] >= 1, where


def test_attention_streams_kv_in_128_bit_pipelined_copies_on_tensor_cores(compiled: list[dict[str, Any]]) -> None:
    for kernel, mma in (("_decode_split_kernel", "HMMA"), ("_extend_kernel", "HGMMA")):
        for r in of(compiled, kernel):
            where = f"{kernel} ({r['case']})"
            assert r["loads"].get("async-128", 0) >= 2, f"{where}: K/V not loaded by 128-bit cp.async: {r['loads']}"
            assert "16" not in r["loads"] and "8" not in r["loads"], f"{where}: narrow loads {r['loads']}"
            assert r["num_stages"] >= 2, where
            assert r["mma"].get(mma, 0) > 0, f"{where}: no {mma} (tensor cores): {r['mma']}"


def test_page_copies_move_128_bits_per_access_when_pages_are_aligned(compiled: list[dict[str, Any]]) -> None:
    rows = of(compiled, "_page_copy_kernel")
    aligned = [r for r in rows if r["constexprs"]["ALIGNED"]]
    assert {r["constexprs"]["TO_STAGING"] for r in aligned} == {True, False}  # gather and scatter
    for r in aligned:
        widths = set(r["loads"]) | set(r["stores"])
        assert "128" in r["loads"] and "128" in r["stores"], f"{r['case']}: {r['loads']} {r['stores']}"
        assert not widths & {"8", "16", "32"}, f"{r['case']}: narrow accesses {r['loads']} {r['stores']}"
    # A pool that starts off 16-byte alignment still builds, on the narrow path, instead of a wrong hint.
    assert any(not r["constexprs"]["ALIGNED"] for r in rows)
