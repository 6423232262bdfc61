"""The engine's CPU attention paths (C decode kernel, grouped SDPA) against the kernel references."""

from __future__ import annotations

import random

import pytest
import torch

from pd_serve.engine.attention import AttentionMetadata, PagedAttention, plan_decode
from pd_serve.intmath import div_ceil
from pd_serve.kernels import cpu_native
from pd_serve.kernels import reference as ref


@pytest.mark.parametrize("native", [False, True], ids=["grouped-sdpa", "cpu-native"])
@pytest.mark.parametrize("page_size,heads,kv_heads", [(7, 8, 2), (16, 4, 4), (1, 8, 1)])
def test_mixed_decode_and_extend_batch_matches_reference(page_size: int, heads: int, kv_heads: int,
                                                         native: bool) -> None:
    if native and cpu_native.load(32, heads // kv_heads) is None:
        pytest.skip("no C compiler: the kernel could not be built")
    rng = random.Random(page_size)
    d, num_pages = 32, 2000
    kp, vp = torch.randn(num_pages, page_size, kv_heads, d), torch.randn(num_pages, page_size, kv_heads, d)
    free = list(range(num_pages))
    rng.shuffle(free)
    # (cached prefix, new tokens): 20 decodes of varied context, then extends with and without a prefix
    seqs = [(rng.randint(0, 60), 1) for _ in range(20)] + [(0, 13), (9, 5), (30, 1 + page_size)]
    tables, slots = [], []
    for prefix, new in seqs:
        n = div_ceil(prefix + new, page_size)
        pages = [free.pop() for _ in range(n)]
        tables.append(pages)
        slots += [pages[i // page_size] * page_size + i % page_size for i in range(prefix, prefix + new)]
    decode = [i for i, (_, new) in enumerate(seqs) if new == 1 and i < 20]
    extend = list(range(20, len(seqs)))
    total = sum(new for _, new in seqs)
    q, k, v = torch.randn(total, heads, d), torch.randn(total, kv_heads, d), torch.randn(total, kv_heads, d)

    def table(rows: list[int]) -> torch.Tensor:
        w = max(len(tables[r]) for r in rows)
        return torch.tensor([tables[r] + [0] * (w - len(tables[r])) for r in rows], dtype=torch.int32)

    dec_lens = [seqs[r][0] + 1 for r in decode]
    starts = [0]
    for r in extend:
        starts.append(starts[-1] + seqs[r][1])
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        num_decode=len(decode),
        decode_page_table=table(decode),
        decode_context_lens=torch.tensor(dec_lens, dtype=torch.int32),
        extend_page_table=table(extend),
        extend_query_start=torch.tensor(starts, dtype=torch.int32),
        extend_context_lens=torch.tensor([sum(seqs[r]) for r in extend], dtype=torch.int32),
        decode_plan=None if native else plan_decode([tables[r] for r in decode], dec_lens, page_size,
                                                    torch.device("cpu")),
    )
    kp2, vp2 = kp.clone(), vp.clone()
    out = PagedAttention([kp], [vp], meta, 0.2).forward(0, q.clone(), k, v)

    ref.store_kv_ref(kp2, vp2, k, v, meta.slot_mapping)
    nd = len(decode)
    expected_dec = ref.paged_decode_attention_ref(q[:nd], kp2, vp2, meta.decode_page_table, meta.decode_context_lens, 0.2)
    expected_ext = ref.extend_attention_ref(q[nd:], kp2, vp2, meta.extend_page_table, meta.extend_query_start,
                                            meta.extend_context_lens, 0.2)
    torch.testing.assert_close(kp, kp2)
    torch.testing.assert_close(out[:nd], expected_dec, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[nd:], expected_ext, rtol=1e-5, atol=1e-5)
