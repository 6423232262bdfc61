"""The torch references against plain dense math, and the backend switch of pd_serve.kernels.ops.

Fresh random inputs every run; the seed is printed so a failure can be replayed.
"""

from __future__ import annotations

import secrets
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from pd_serve.kernels import ops, reference
from pd_serve.kernels.testing import PagedCase, make_case, tolerances


@pytest.fixture(autouse=True)
def _fresh_seed() -> None:
    seed = secrets.randbits(31)
    print(f"torch seed {seed}")
    torch.manual_seed(seed)


def _dense_attention(case: PagedCase, i: int, q_rows: torch.Tensor) -> torch.Tensor:
    """q_rows [q_len, num_heads, d] at the end of sequence i, causal, through SDPA on un-paged K/V."""
    k, v = case.dense_k[i], case.dense_v[i]
    q_len, ctx = q_rows.shape[0], k.shape[0]
    mask = torch.ones(q_len, ctx, dtype=torch.bool).tril(diagonal=ctx - q_len)
    out = F.scaled_dot_product_attention(
        q_rows.transpose(0, 1).float(),
        k.transpose(0, 1).float(),
        v.transpose(0, 1).float(),
        attn_mask=mask,
        scale=case.scale,
        enable_gqa=True,
    )
    return out.transpose(0, 1).to(q_rows.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("group", "head_dim", "page_size"), [(1, 64, 7), (4, 128, 16), (8, 64, 5)])
def test_decode_reference_matches_dense(
    dtype: torch.dtype, group: int, head_dim: int, page_size: int
) -> None:
    lens = [1, 40, 17] + [int(n) for n in torch.randint(1, 60, (40,))]  # > one group of 32
    case = make_case(lens, [1] * len(lens), 2 * group, 2, head_dim, page_size, dtype)
    out = reference.paged_decode_attention_ref(
        case.q, case.k_pool, case.v_pool, case.page_table, case.context_lens, case.scale
    )
    for i in range(len(lens)):
        torch.testing.assert_close(
            out[i : i + 1], _dense_attention(case, i, case.q[i : i + 1]), **tolerances(dtype)
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("group", "head_dim", "page_size"), [(1, 64, 7), (4, 128, 16), (8, 64, 5)])
def test_extend_reference_matches_dense(
    dtype: torch.dtype, group: int, head_dim: int, page_size: int
) -> None:
    q_lens, prefixes = [1, 13, 9, 4], [0, 0, 11, 30]
    case = make_case(
        [p + n for p, n in zip(prefixes, q_lens)], q_lens, 2 * group, 2, head_dim, page_size, dtype
    )
    out = reference.extend_attention_ref(
        case.q, case.k_pool, case.v_pool, case.page_table, case.query_start, case.context_lens, case.scale
    )
    starts = case.query_start.tolist()
    for i in range(len(q_lens)):
        rows = slice(starts[i], starts[i + 1])
        torch.testing.assert_close(out[rows], _dense_attention(case, i, case.q[rows]), **tolerances(dtype))


def test_movement_references_round_trip() -> None:
    pools = [torch.randn(9, 7, 2, 64) for _ in range(4)]
    ids = torch.randperm(9)[:5]
    staging = torch.empty(4, 5, 7, 2, 64)
    reference.gather_pages_ref(pools, ids, staging)
    assert all(torch.equal(staging[i], pools[i][ids]) for i in range(4))
    fresh = [torch.zeros_like(p) for p in pools]
    reference.scatter_pages_ref(staging, fresh, ids)
    assert all(torch.equal(fresh[i][ids], pools[i][ids]) for i in range(4))
    k_pool, v_pool = torch.zeros(3, 7, 2, 64), torch.zeros(3, 7, 2, 64)
    k, v, slots = torch.randn(4, 2, 64), torch.randn(4, 2, 64), torch.tensor([20, 0, 7, 13])
    reference.store_kv_ref(k_pool, v_pool, k, v, slots)
    assert torch.equal(k_pool[2, 6], k[0]) and torch.equal(v_pool[1, 6], v[3])


def test_rms_norm_reference_matches_functional() -> None:
    x, residual, weight = torch.randn(5, 96), torch.randn(5, 96), torch.randn(96)
    normed, new_residual = reference.rms_norm_ref(x, weight, 1e-6, residual)
    torch.testing.assert_close(new_residual, x + residual)
    torch.testing.assert_close(normed, F.rms_norm(x + residual, (96,), weight, 1e-6))


def test_rotary_reference_is_a_complex_rotation() -> None:
    positions, head_dim = torch.randint(0, 50, (6,)), 64
    freqs = torch.outer(torch.arange(50).float(), torch.rand(head_dim // 2))
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    q, k = torch.randn(6, 4, head_dim), torch.randn(6, 2, head_dim)
    expected = []
    for t in (q, k):
        z = torch.complex(t[..., : head_dim // 2], t[..., head_dim // 2 :])
        z = z * torch.polar(torch.ones_like(freqs[positions]), freqs[positions])[:, None, :]
        expected.append(torch.cat((z.real, z.imag), dim=-1))
    reference.rotary_ref(q, k, positions, cos_sin)
    torch.testing.assert_close(q, expected[0])
    torch.testing.assert_close(k, expected[1])


def test_auto_backend_runs_the_reference_on_cpu() -> None:
    x = torch.randn(3, 8)
    with ops.use_backend("auto"):
        assert (
            ops._pick(reference.rms_norm_ref, "triton_norm", "rms_norm_triton", x) is reference.rms_norm_ref
        )
    with ops.use_backend("torch"):
        torch.testing.assert_close(
            ops.rms_norm(x, torch.ones(8), 1e-6)[0], reference.rms_norm_ref(x, torch.ones(8), 1e-6)[0]
        )


def test_use_backend_restores_and_rejects_unknown_names() -> None:
    before = ops.get_backend()
    with ops.use_backend("triton"):
        assert ops.get_backend() == "triton"
    assert ops.get_backend() == before
    with pytest.raises(ValueError, match="set_backend: unknown kernel backend 'cuda'"):
        ops.set_backend("cuda")


def _python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_kernels_import_and_run_without_triton() -> None:
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from pd_serve.kernels import ops\n"
        "assert not ops.triton_available()\n"
        "ops.rms_norm(torch.randn(2, 4), torch.ones(4), 1e-6)\n"
        "ops.set_backend('triton')\n"
        "try:\n"
        "    ops.rms_norm(torch.randn(2, 4), torch.ones(4), 1e-6)\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert "triton is not installed" in result.stdout


def test_unknown_backend_in_environment_is_named() -> None:
    import os

    result = _python("import pd_serve.kernels.ops", env={**os.environ, "PD_SERVE_KERNELS": "fast"})
    assert result.returncode != 0
    assert "PD_SERVE_KERNELS" in result.stderr and "'fast'" in result.stderr
