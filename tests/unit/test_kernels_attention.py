"""Triton decode and extend attention under TRITON_INTERPRET=1 on CPU, against the torch references.

The interpreter is chosen when the kernels are decorated, so the variable is set before the Triton
modules are imported. With PD_SERVE_TEST_DEVICE=cuda the same tests run compiled on a GPU
(bench/gpu_checks.sh). Outputs start as NaN and must come back fully written. Small block sizes are
forced through the `*_into` launchers so that short contexts still span several blocks and splits.
"""

from __future__ import annotations

import secrets

from pd_serve.kernels.testing import kernel_test_device

DEVICE = kernel_test_device()  # before the Triton modules are imported: "cpu" sets TRITON_INTERPRET=1

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from pd_serve.kernels import ops, reference  # noqa: E402
from pd_serve.kernels.testing import PagedCase, make_case, poisoned_like, tolerances  # noqa: E402
from pd_serve.kernels.triton_decode import decode_into, paged_decode_attention_triton  # noqa: E402
from pd_serve.kernels.triton_extend import extend_attention_triton, extend_into  # noqa: E402

# (GQA group, head_dim, page_size): ratios 1, 4 and 8, both head dims, odd page sizes.
SHAPES = [(1, 64, 7), (4, 128, 16), (8, 64, 5)]
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def _fresh_seed() -> None:
    seed = secrets.randbits(31)
    print(f"torch seed {seed}")
    torch.manual_seed(seed)


def _decode_ref(case: PagedCase) -> torch.Tensor:
    return reference.paged_decode_attention_ref(
        case.q, case.k_pool, case.v_pool, case.page_table, case.context_lens, case.scale
    )


def _extend_ref(case: PagedCase) -> torch.Tensor:
    return reference.extend_attention_ref(
        case.q, case.k_pool, case.v_pool, case.page_table, case.query_start, case.context_lens, case.scale
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("group", "head_dim", "page_size"), SHAPES)
@pytest.mark.parametrize(("num_splits", "block_n"), [(1, 64), (4, 16)])
def test_decode_matches_reference(
    dtype: torch.dtype, group: int, head_dim: int, page_size: int, num_splits: int, block_n: int
) -> None:
    """Context 1, a context longer than one block, and a random one; splits past the end stay empty."""
    lens = [1, 37, int(torch.randint(2, 30, ()))]
    case = make_case(lens, [1] * len(lens), 2 * group, 2, head_dim, page_size, dtype)
    out = poisoned_like(case.q)
    decode_into(
        case.q,
        case.k_pool,
        case.v_pool,
        case.page_table,
        case.context_lens,
        case.scale,
        out,
        num_splits,
        block_n,
    )
    assert not out.isnan().any()
    torch.testing.assert_close(out, _decode_ref(case), **tolerances(dtype))


def test_decode_public_wrapper_and_dispatch() -> None:
    case = make_case([5, 23], [1, 1], 8, 2, 64, 7, torch.float32)
    expected = _decode_ref(case)
    args = (case.q, case.k_pool, case.v_pool, case.page_table, case.context_lens, case.scale)
    torch.testing.assert_close(paged_decode_attention_triton(*args), expected, **tolerances(torch.float32))
    with ops.use_backend("triton"):
        torch.testing.assert_close(ops.paged_decode_attention(*args), expected, **tolerances(torch.float32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("group", "head_dim", "page_size"), SHAPES)
@pytest.mark.parametrize(("block_m", "block_n"), [(64, 64), (16, 16)])
def test_extend_matches_reference(
    dtype: torch.dtype, group: int, head_dim: int, page_size: int, block_m: int, block_n: int
) -> None:
    """A one-token prompt, a fresh prompt, chunks after cached prefixes; lengths off the page size."""
    q_lens, prefixes = [1, 19, 6, 3], [0, 0, 9, int(torch.randint(1, 25, ()))]
    lens = [p + n for p, n in zip(prefixes, q_lens)]
    case = make_case(lens, q_lens, 2 * group, 2, head_dim, page_size, dtype)
    out = poisoned_like(case.q)
    extend_into(
        case.q, case.k_pool, case.v_pool, case.page_table, case.query_start, case.context_lens,
        case.scale, out, block_m, block_n,
    )  # fmt: skip
    assert not out.isnan().any()
    torch.testing.assert_close(out, _extend_ref(case), **tolerances(dtype))


def test_extend_public_wrapper_and_dispatch() -> None:
    case = make_case([12, 4], [5, 4], 4, 1, 128, 16, torch.bfloat16)
    expected = _extend_ref(case)
    args = (
        case.q,
        case.k_pool,
        case.v_pool,
        case.page_table,
        case.query_start,
        case.context_lens,
        case.scale,
    )
    torch.testing.assert_close(extend_attention_triton(*args), expected, **tolerances(torch.bfloat16))
    with ops.use_backend("triton"):
        torch.testing.assert_close(ops.extend_attention(*args), expected, **tolerances(torch.bfloat16))


def test_attention_wrappers_name_the_bad_argument() -> None:
    case = make_case([5], [1], 4, 2, 64, 7, torch.float32)
    with pytest.raises(ValueError, match="q: num_heads 3 is not a multiple of k_pool's kv_heads 2"):
        paged_decode_attention_triton(
            case.q[:, :3], case.k_pool, case.v_pool, case.page_table, case.context_lens, case.scale
        )
    with pytest.raises(ValueError, match="v_pool: dtype torch.bfloat16 differs"):
        paged_decode_attention_triton(
            case.q, case.k_pool, case.v_pool.bfloat16(), case.page_table, case.context_lens, case.scale
        )
    with pytest.raises(ValueError, match="query_start: dim 0 is 3, expected 2"):
        extend_attention_triton(
            case.q, case.k_pool, case.v_pool, case.page_table, torch.tensor([0, 1, 1]), case.context_lens, 1.0
        )
    with pytest.raises(ValueError, match="page_table: dtype torch.float32"):
        paged_decode_attention_triton(
            case.q, case.k_pool, case.v_pool, case.page_table.float(), case.context_lens, case.scale
        )
