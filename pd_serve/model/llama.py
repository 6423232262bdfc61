"""Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) running on the paged KV cache.

Tokens of all sequences in a step are flattened into one `[num_tokens, hidden]` batch. Attention
goes through the `AttentionBackend` in the `ForwardBatch`, which writes the new K/V into the pools
and reads each sequence's context through its page table. The model owns no KV memory and holds
no per-forward state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from pd_serve.kernels.layer_ops import TORCH_LAYER_OPS, LayerOps
from pd_serve.kernels.ops import rms_norm, rotary
from pd_serve.model.config import ModelConfig


class AttentionBackend(Protocol):
    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, H, D], k/v [T, KVH, D] for the new tokens -> attention output [T, H, D]."""
        ...


@dataclass
class ForwardBatch:
    """Everything one forward pass needs beside the weights; built by the runner per step."""

    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64, each < the model's max_positions (the caller checks)
    attention: AttentionBackend
    ops: LayerOps = TORCH_LAYER_OPS  # the dense ops' implementation (kernels.layer_ops.layer_ops)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, ops: LayerOps | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if ops is None:
            return rms_norm(x, self.weight, self.eps, residual)
        return ops.rms_norm(x, self.weight, self.eps, residual)


def rope_cos_sin(config: ModelConfig, max_positions: int, device: str | None = None) -> torch.Tensor:
    """[max_positions, head_dim] float32: cos of each frequency, then sin (each frequency twice).
    `device`: where to build it (default: the current default device)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    if config.rope_scaling is not None:
        inv_freq = _llama3_scale(inv_freq, config)
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.int64, device=device).float(), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).contiguous()


def _llama3_scale(inv_freq: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    rs = config.rope_scaling
    assert rs is not None
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        # q, k and v projections fused into one matmul; the loader concatenates the checkpoint's three.
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        n, ops = x.shape[0], batch.ops
        qkv = ops.linear(x, self.qkv_proj.weight, self.qkv_proj.bias)
        if self.q_norm is not None and self.k_norm is not None:
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = self.q_norm(q.reshape(n, self.num_heads, self.head_dim))[0]
            k = self.k_norm(k.reshape(n, self.num_kv_heads, self.head_dim))[0]
            v = v.reshape(n, self.num_kv_heads, self.head_dim)
            rotary(q, k, positions, cos_sin)
        else:
            q, k, v = ops.qkv_rotary(qkv, self.num_heads, self.num_kv_heads, positions, cos_sin)
        out = batch.attention.forward(self.layer, q, k, v)
        return ops.linear(out.reshape(n, self.q_size), self.o_proj.weight, None)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        # gate and up projections fused; the loader concatenates them.
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, ops: LayerOps) -> torch.Tensor:
        return ops.linear(ops.silu_mul(ops.linear(x, self.gate_up_proj.weight, None)), self.down_proj.weight, None)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        cos_sin: torch.Tensor,
        batch: ForwardBatch,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h, residual = self.input_layernorm(x, residual, batch.ops)
        h = self.self_attn(h, positions, cos_sin, batch)
        h, residual = self.post_attention_layernorm(h, residual, batch.ops)
        return self.mlp(h, batch.ops), residual


class LlamaForCausalLM(nn.Module):
    """Parameter names follow Hugging Face's, except the fused `qkv_proj` and `gate_up_proj`."""

    def __init__(self, config: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.config = config
        self.max_positions = max_positions  # rows of cos_sin: every position must be below it
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # on the CPU even when the model is built on the meta device (the loader's way, which then
        # computes it again where the model runs): on meta, torch runs these ops as Python reference
        # kernels, which import torch._dynamo (a second of every engine's start)
        self.register_buffer("cos_sin", rope_cos_sin(config, max_positions, device="cpu"), persistent=False)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """-> final hidden states [num_tokens, hidden]."""
        x = self.embed_tokens(batch.input_ids)
        residual: torch.Tensor | None = None
        for layer in self.layers:
            x, residual = layer(x, residual, batch.positions, self.cos_sin, batch)
        return self.norm(x, residual, batch.ops)[0]

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor, ops: LayerOps = TORCH_LAYER_OPS) -> torch.Tensor:
        """[n, hidden] -> float32 logits [n, vocab]."""
        return ops.linear(hidden, self.lm_head.weight, None).float()
