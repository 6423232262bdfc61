"""Random paged-KV inputs for the kernel tests and the kernel benchmark, with their dense twins.

A case scatters each sequence's K/V over shuffled, non-adjacent pages of a pool that also holds
unrelated random pages, and pads each page table row with ids of those unrelated pages, so a
kernel that reads past a context shows up as a wrong answer. Nothing here is used by the engine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

TEST_DEVICE_VAR = "PD_SERVE_TEST_DEVICE"


def kernel_test_device() -> str:
    """Where the kernel tests run: "cpu" (default) under Triton's interpreter, or "cuda" compiled.

    Called by the kernel test modules before they import the Triton modules: on CPU it sets
    TRITON_INTERPRET=1 (read when the kernels are decorated); with PD_SERVE_TEST_DEVICE=cuda it
    makes CUDA the default device instead, so that the same tests run on a GPU:
    `PD_SERVE_TEST_DEVICE=cuda python3 -m pytest tests/unit/test_kernels_attention.py
    tests/unit/test_kernels_elementwise.py` (bench/gpu_checks.sh does that).
    """
    device = os.environ.get(TEST_DEVICE_VAR, "cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"{TEST_DEVICE_VAR}: {device!r}; use cpu or cuda")
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        if os.environ.get("TRITON_INTERPRET") == "1":
            raise ValueError(f"{TEST_DEVICE_VAR}=cuda runs the compiled kernels: unset TRITON_INTERPRET")
        torch.set_default_device("cuda")
    return device


@dataclass(frozen=True)
class PagedCase:
    q: torch.Tensor  # [rows, num_heads, head_dim]: batch rows (decode) or new tokens (extend)
    k_pool: torch.Tensor  # [num_pages, page_size, kv_heads, head_dim]
    v_pool: torch.Tensor  # [num_pages, page_size, kv_heads, head_dim]
    page_table: torch.Tensor  # [batch, max_pages] int32
    context_lens: torch.Tensor  # [batch] int32
    query_start: torch.Tensor  # [batch + 1] int32, offsets of each sequence's rows in q
    dense_k: list[torch.Tensor]  # per sequence [context_len, kv_heads, head_dim]
    dense_v: list[torch.Tensor]  # per sequence [context_len, kv_heads, head_dim]

    @property
    def scale(self) -> float:
        return float(self.q.shape[-1]) ** -0.5


def make_case(
    context_lens: list[int],
    q_lens: list[int],
    num_heads: int,
    kv_heads: int,
    head_dim: int,
    page_size: int,
    dtype: torch.dtype,
    device: str | None = None,  # None: torch's default device
) -> PagedCase:
    """q_lens[i] new tokens (1 for decode) at the end of a context of context_lens[i] tokens."""
    pages_per_seq = [-(-n // page_size) for n in context_lens]
    max_pages = max(pages_per_seq) + 1  # one spare column of padding for every row
    num_pages = sum(pages_per_seq) + 2 * max_pages
    k_pool = torch.randn(num_pages, page_size, kv_heads, head_dim, dtype=dtype, device=device)
    v_pool = torch.randn_like(k_pool)
    perm = torch.randperm(num_pages, device=device)
    owned, spare = perm[: sum(pages_per_seq)], perm[sum(pages_per_seq) :]
    page_table = spare[torch.randint(len(spare), (len(context_lens), max_pages), device=device)]
    dense_k, dense_v, used = [], [], 0
    for i, (n, p) in enumerate(zip(context_lens, pages_per_seq)):
        ids = owned[used : used + p]
        used += p
        page_table[i, :p] = ids
        dense_k.append(k_pool[ids].reshape(-1, kv_heads, head_dim)[:n])
        dense_v.append(v_pool[ids].reshape(-1, kv_heads, head_dim)[:n])
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    return PagedCase(
        q=torch.randn(starts[-1], num_heads, head_dim, dtype=dtype, device=device),
        k_pool=k_pool,
        v_pool=v_pool,
        page_table=page_table.to(torch.int32),
        context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),
        query_start=torch.tensor(starts, dtype=torch.int32, device=device),
        dense_k=dense_k,
        dense_v=dense_v,
    )


def poisoned_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A NaN-filled tensor shaped like t: any element a kernel forgets to write stays NaN."""
    return torch.full(t.shape, float("nan"), dtype=dtype or t.dtype, device=t.device)


def tolerances(dtype: torch.dtype) -> dict[str, float]:
    """assert_close tolerances: 1e-5 relative in float32, 1e-2 in half types."""
    if dtype == torch.float32:
        return {"rtol": 1e-5, "atol": 1e-5}
    return {"rtol": 1e-2, "atol": 1e-2}
