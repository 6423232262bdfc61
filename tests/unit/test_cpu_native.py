"""The C decode-attention kernel (kernels.cpu_native) against the torch reference, on random paged pools."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
import torch

from pd_serve.intmath import div_ceil
from pd_serve.kernels import cpu_native
from pd_serve.kernels import reference as ref

pytestmark = pytest.mark.skipif(cpu_native.load(64, 4) is None, reason="no C compiler: the kernel could not be built")


def _case(b: int, heads: int, kv_heads: int, head_dim: int, page_size: int, max_ctx: int, seed: int):
    rng = random.Random(seed)
    lens = [rng.randint(1, max_ctx) for _ in range(b)]
    lens[0] = 1  # a context of one token
    num_pages = sum(div_ceil(n, page_size) for n in lens) + 3
    free = list(range(num_pages))
    rng.shuffle(free)
    width = max(div_ceil(n, page_size) for n in lens)
    rows = []
    for n in lens:
        pages = [free.pop() for _ in range(div_ceil(n, page_size))]
        rows.append(pages + [0] * (width - len(pages)))
    q = torch.randn(b, heads, head_dim)
    kp, vp = torch.randn(num_pages, page_size, kv_heads, head_dim), torch.randn(num_pages, page_size, kv_heads, head_dim)
    return q, kp, vp, torch.tensor(rows, dtype=torch.int32), torch.tensor(lens, dtype=torch.int32)


@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,page_size",
    [(8, 8, 64, 16), (8, 2, 128, 7), (16, 2, 64, 1), (8, 1, 32, 5), (4, 4, 128, 32)],
)
def test_matches_reference(heads: int, kv_heads: int, head_dim: int, page_size: int) -> None:
    q, kp, vp, table, lens = _case(13, heads, kv_heads, head_dim, page_size, 300, seed=heads * page_size)
    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    cpu_native.paged_decode_attention(q, kp, vp, table, lens, 0.125, out)
    expected = ref.paged_decode_attention_ref(q, kp, vp, table, lens, 0.125)
    assert not out.isnan().any()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_reads_only_the_pages_in_the_table() -> None:
    q, kp, vp, table, lens = _case(5, 8, 2, 64, 16, 100, seed=1)
    used = set(table.flatten().tolist())
    expected = cpu_native.paged_decode_attention(q, kp, vp, table, lens, 0.1)
    for p in range(kp.shape[0]):
        if p not in used:
            kp[p], vp[p] = float("nan"), float("nan")
    for r, n in enumerate(lens.tolist()):  # slots past each context, in its own last page
        last = int(table[r, (n - 1) // 16])
        if n % 16:
            kp[last, n % 16 :], vp[last, n % 16 :] = float("inf"), float("inf")
    torch.testing.assert_close(cpu_native.paged_decode_attention(q, kp, vp, table, lens, 0.1), expected)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda t: {**t, "lens": t["lens"] + 10_000}, "context_lens must be in"),
        (lambda t: {**t, "lens": t["lens"] * 0}, "context_lens must be in"),
        (lambda t: {**t, "table": t["table"] + 10_000}, "page ids must be in"),
        (lambda t: {**t, "table": t["table"].long()}, "int32"),
        (lambda t: {**t, "q": t["q"].double()}, "float32 only"),
        (lambda t: {**t, "q": t["q"][:, :3]}, "shapes do not match"),
        (lambda t: {**t, "q": t["q"][:, :, :32]}, "shapes do not match"),
    ],
)
def test_bad_arguments_are_named_before_the_c_code_runs(change, message: str) -> None:
    q, kp, vp, table, lens = _case(4, 8, 2, 64, 16, 50, seed=2)
    t = change({"q": q, "table": table, "lens": lens})
    with pytest.raises(ValueError, match=message):
        cpu_native.paged_decode_attention(t["q"].contiguous(), kp, vp, t["table"], t["lens"], 0.1)


def test_disabled_by_environment_variable() -> None:
    code = "from pd_serve.kernels import cpu_native; print(cpu_native.load(64, 4) is None)"
    out = subprocess.run([sys.executable, "-c", code], env={"PD_SERVE_CPU_NATIVE": "0", "PATH": ""},
                         capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "True"
