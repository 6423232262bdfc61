"""Triton store_kv, page gather/scatter, RMSNorm and rotary under TRITON_INTERPRET=1, against the references.

The interpreter is chosen when the kernels are decorated, so the variable is set before the Triton
modules are imported. With PD_SERVE_TEST_DEVICE=cuda the same tests run compiled on a GPU
(bench/gpu_checks.sh). Buffers a kernel must fill start as NaN and must come back fully written.
"""

from __future__ import annotations

import secrets

from pd_serve.kernels.testing import kernel_test_device

DEVICE = kernel_test_device()  # before the Triton modules are imported: "cpu" sets TRITON_INTERPRET=1

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from pd_serve.kernels import ops, reference  # noqa: E402
from pd_serve.kernels.testing import poisoned_like, tolerances  # noqa: E402
from pd_serve.kernels.triton_kv import gather_pages_triton, scatter_pages_triton, store_kv_triton  # noqa: E402
from pd_serve.kernels.triton_norm import rms_norm_into, rms_norm_triton, rotary_triton  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def _fresh_seed() -> None:
    seed = secrets.randbits(31)
    print(f"torch seed {seed}")
    torch.manual_seed(seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("kv_heads", "head_dim", "page_size"), [(1, 64, 7), (3, 128, 16), (8, 64, 5)])
def test_store_kv_matches_reference(dtype: torch.dtype, kv_heads: int, head_dim: int, page_size: int) -> None:
    """Only the mapped slots change; new K/V arrive as float32 and as strided views, as from qkv."""
    k_pool = torch.randn(6, page_size, kv_heads, head_dim, dtype=dtype)
    v_pool = torch.randn_like(k_pool)
    num_tokens = 11
    slots = torch.randperm(6 * page_size)[:num_tokens]
    kv = torch.randn(num_tokens, 2, kv_heads, head_dim)  # k and v interleaved: non-contiguous views
    k, v = kv[:, 0], kv[:, 1]
    expected_k, expected_v = k_pool.clone(), v_pool.clone()
    reference.store_kv_ref(expected_k, expected_v, k, v, slots)
    store_kv_triton(k_pool, v_pool, k, v, slots)
    assert torch.equal(k_pool, expected_k) and torch.equal(v_pool, expected_v)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("page_size", "kv_heads", "head_dim"), [(7, 2, 64), (16, 8, 128)])
def test_gather_then_scatter_match_reference(
    dtype: torch.dtype, page_size: int, kv_heads: int, head_dim: int
) -> None:
    """All layers' K and V pools (here 3 layers) in one launch; ids out of order."""
    pools = [torch.randn(10, page_size, kv_heads, head_dim, dtype=dtype) for _ in range(6)]
    ids = torch.randperm(10)[:5]
    staging = torch.empty(6, 5, page_size, kv_heads, head_dim, dtype=dtype)
    reference.gather_pages_ref(pools, ids, staging)
    out = poisoned_like(staging)
    gather_pages_triton(pools, ids, out)
    assert torch.equal(out, staging)

    targets = [poisoned_like(p) for p in pools]
    expected = [t.clone() for t in targets]
    reference.scatter_pages_ref(staging, expected, ids)
    scatter_pages_triton(staging, targets, ids)
    for got, want in zip(targets, expected):
        assert torch.equal(got[ids], want[ids])
        assert got.isnan().sum() == want.isnan().sum()  # pages not named stay untouched


def test_page_copy_of_pools_off_16_byte_alignment() -> None:
    """Pools that are views one element into a buffer take the unhinted path and still copy exactly."""
    shape = (6, 5, 2, 32)
    flat = [torch.randn(6 * 5 * 2 * 32 + 1, dtype=torch.bfloat16) for _ in range(2)]
    pools = [f[1:].view(shape) for f in flat]
    assert all(p.data_ptr() % 16 for p in pools)
    ids = torch.tensor([4, 0, 2])
    staging = torch.empty(2, 3, *shape[1:], dtype=torch.bfloat16)
    reference.gather_pages_ref(pools, ids, staging)
    out = poisoned_like(staging)
    gather_pages_triton(pools, ids, out)
    assert torch.equal(out, staging)
    for f in flat:
        f.fill_(float("nan"))
    scatter_pages_triton(staging, pools, ids)
    for i, pool in enumerate(pools):
        assert torch.equal(pool[ids], staging[i])
        assert pool[[1, 3, 5]].isnan().all() and flat[i][0].isnan()  # nothing else written


def test_page_copy_dispatch_and_checks() -> None:
    pools = [torch.randn(4, 7, 2, 64) for _ in range(2)]
    out = torch.empty(2, 2, 7, 2, 64)
    with ops.use_backend("triton"):
        ops.gather_pages(pools, torch.tensor([3, 1]), out)
    assert torch.equal(out[1, 0], pools[1][3])
    with pytest.raises(ValueError, match=r"pools\[1\]: shape, strides and dtype must equal pools\[0\]'s"):
        gather_pages_triton([pools[0], pools[1].bfloat16()], torch.tensor([0, 1]), out)
    with pytest.raises(ValueError, match=r"out: shape \(2, 3, 7, 2, 64\), expected \(2, 2, 7, 2, 64\)"):
        gather_pages_triton(pools, torch.tensor([0, 1]), torch.empty(2, 3, 7, 2, 64))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_dtype", [torch.float32, None])
@pytest.mark.parametrize("with_residual", [True, False])
def test_rms_norm_matches_reference(
    dtype: torch.dtype, weight_dtype: torch.dtype | None, with_residual: bool
) -> None:
    x = torch.randn(5, 100, dtype=dtype)  # hidden 100: not a power of two
    weight = torch.randn(100, dtype=weight_dtype or dtype)
    residual = torch.randn_like(x) if with_residual else None
    want, want_residual = reference.rms_norm_ref(x, weight, 1e-6, residual)
    out = poisoned_like(want)
    new_residual = poisoned_like(x) if with_residual else None
    rms_norm_into(x, weight, 1e-6, residual, out, new_residual)
    assert not out.isnan().any()
    torch.testing.assert_close(out, want, **tolerances(dtype))
    if new_residual is not None:
        torch.testing.assert_close(new_residual, want_residual, **tolerances(dtype))
    got, got_residual = rms_norm_triton(x, weight, 1e-6, residual)
    assert got.dtype == want.dtype and (with_residual or got_residual is x)
    torch.testing.assert_close(got, want, **tolerances(dtype))


def test_rms_norm_per_head_on_a_strided_view() -> None:
    """q/k norm: [tokens, heads, head_dim] cut out of a fused qkv row."""
    qkv = torch.randn(4, 3 * 128)
    q = qkv[:, :256].reshape(4, 2, 128)
    weight = torch.randn(128)
    with ops.use_backend("triton"):
        got = ops.rms_norm(q, weight, 1e-5)[0]
    torch.testing.assert_close(got, reference.rms_norm_ref(q, weight, 1e-5)[0], **tolerances(torch.float32))


def _cos_sin(max_positions: int, head_dim: int) -> torch.Tensor:
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.outer(torch.arange(max_positions).float(), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_heads", "kv_heads", "head_dim"), [(3, 3, 64), (8, 2, 128), (8, 1, 64)])
def test_rotary_matches_reference(dtype: torch.dtype, num_heads: int, kv_heads: int, head_dim: int) -> None:
    positions = torch.randint(0, 300, (9,))
    cos_sin = _cos_sin(300, head_dim)
    qkv = torch.randn(9, num_heads + 2 * kv_heads, head_dim, dtype=dtype)
    q, k = qkv[:, :num_heads], qkv[:, num_heads : num_heads + kv_heads]  # strided views, rotated in place
    want_q, want_k = q.clone(), k.clone()
    reference.rotary_ref(want_q, want_k, positions, cos_sin)
    rotary_triton(q, k, positions, cos_sin)
    torch.testing.assert_close(q, want_q, **tolerances(dtype))
    torch.testing.assert_close(k, want_k, **tolerances(dtype))
    assert not qkv.isnan().any()


def test_rotary_checks_name_the_argument() -> None:
    q, k = torch.randn(2, 4, 64), torch.randn(2, 2, 64)
    with pytest.raises(ValueError, match="cos_sin: dim 1 is 32, expected 64"):
        rotary_triton(q, k, torch.tensor([0, 1]), torch.randn(8, 32))
    with pytest.raises(ValueError, match="positions: dim 0 is 3, expected 2"):
        rotary_triton(q, k, torch.tensor([0, 1, 2]), torch.randn(8, 64))
