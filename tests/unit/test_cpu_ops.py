"""The C dense ops (kernels.cpu_ops) and both LayerOps against torch and the references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pd_serve.kernels import cpu_ops, layer_ops
from pd_serve.kernels import reference as ref

pytestmark = pytest.mark.skipif(cpu_ops.load() is None, reason="no C compiler: the kernels could not be built")


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 13])
@pytest.mark.parametrize("n,k,bias", [(960, 576, False), (7, 33, True), (576, 1536, False), (4, 16, True)])
def test_linear_matches_torch(m: int, n: int, k: int, bias: bool) -> None:
    g = torch.Generator().manual_seed(m * 1000 + n)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    torch.testing.assert_close(cpu_ops.linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("rows", [1, 5, 33])
def test_rms_norm_matches_reference(rows: int, with_residual: bool) -> None:
    x, w = torch.randn(rows, 576), torch.randn(576)
    residual = torch.randn(rows, 576) if with_residual else None
    want = ref.rms_norm_ref(x, w, 1e-5, residual)
    got = cpu_ops.rms_norm(x, w, 1e-5, None if residual is None else residual.clone())
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


def test_qkv_rotary_matches_split_and_reference() -> None:
    t, heads, kv_heads, d = 6, 9, 3, 64
    qkv, cos_sin = torch.randn(t, (heads + 2 * kv_heads) * d), torch.randn(300, d)
    positions = torch.tensor([0, 5, 299, 7, 2, 2])
    want = layer_ops.TORCH_LAYER_OPS.qkv_rotary(qkv, heads, kv_heads, positions, cos_sin)
    got = cpu_ops.qkv_rotary(qkv, heads, kv_heads, positions, cos_sin)
    for g, w in zip(got, want):
        assert g.is_contiguous()
        torch.testing.assert_close(g, w)


def test_silu_mul_matches_torch() -> None:
    gate_up = torch.randn(7, 2 * 1536) * 4
    torch.testing.assert_close(cpu_ops.silu_mul(gate_up), F.silu(gate_up[:, :1536]) * gate_up[:, 1536:])


def test_wrong_dtype_or_layout_is_named_before_the_c_code_runs() -> None:
    with pytest.raises(ValueError, match="x must be a contiguous float32 CPU tensor"):
        cpu_ops.linear(torch.randn(2, 8, dtype=torch.float64), torch.randn(4, 8))
    with pytest.raises(ValueError, match="shapes do not match"):
        cpu_ops.linear(torch.randn(2, 8), torch.randn(4, 9))
    with pytest.raises(ValueError, match="gate_up must be"):
        cpu_ops.silu_mul(torch.randn(8, 4).t())
    with pytest.raises(ValueError, match="shapes do not match"):
        cpu_ops.qkv_rotary(torch.randn(2, 10 * 8), 4, 2, torch.zeros(2, dtype=torch.long), torch.randn(5, 8))


def test_cpu_layer_ops_hand_many_rows_to_torch() -> None:
    rows = cpu_ops.LINEAR_MAX_ROWS + 1
    x, w = torch.randn(rows, 16), torch.randn(4, 16)
    torch.testing.assert_close(layer_ops.CPU_LAYER_OPS.linear(x, w, None), F.linear(x, w))
    assert layer_ops.layer_ops(torch.device("cpu"), torch.float32) is layer_ops.CPU_LAYER_OPS
    assert layer_ops.layer_ops(torch.device("cpu"), torch.bfloat16) is layer_ops.TORCH_LAYER_OPS


def test_store_kv_matches_reference() -> None:
    k_pool, v_pool = torch.randn(5, 4, 3, 8), torch.randn(5, 4, 3, 8)
    k, v = torch.randn(6, 3, 8), torch.randn(6, 3, 8)
    slots = torch.tensor([0, 19, 7, 8, 3, 12])
    want_k, want_v = k_pool.clone(), v_pool.clone()
    ref.store_kv_ref(want_k, want_v, k, v, slots)
    cpu_ops.store_kv(k_pool, v_pool, k, v, slots)
    assert torch.equal(k_pool, want_k) and torch.equal(v_pool, want_v)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])  # a qkv bias; q/k norms (the split path)
def test_both_layer_ops_run_the_model_alike(arch: str, tiny_models) -> None:
    from pd_serve import LLM, SamplingParams

    llm = LLM(model=str(tiny_models[arch]), show_progress=False, dtype="float32", max_total_tokens=1024)
    prompts = [[11 + i, 12, 13, 14 + i, 15] for i in range(3)]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    assert llm.engine.runner.ops is layer_ops.CPU_LAYER_OPS
    c_logits, c_tokens = llm.engine.prompt_logits(prompts[0]), [o.token_ids for o in llm.generate(prompts, params)]
    llm.engine.runner.ops = layer_ops.TORCH_LAYER_OPS  # what a GPU forward runs
    torch.testing.assert_close(llm.engine.prompt_logits(prompts[0]), c_logits, rtol=1e-4, atol=1e-4)
    assert [o.token_ids for o in llm.generate(prompts, params)] == c_tokens
