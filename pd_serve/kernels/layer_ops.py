"""The dense ops of a decoder layer, one object per implementation, picked once per forward pass.

- `TorchLayerOps`: `ops.rms_norm` and `ops.rotary` (Triton on CUDA, the torch references
  elsewhere), `F.linear` and `silu(gate) * up`. Every GPU forward runs this one.
- `CpuLayerOps`: the C kernels of `cpu_ops` for float32 on the CPU (one call per op instead of
  torch's five to twenty), `linear` through C up to `cpu_ops.LINEAR_MAX_ROWS` rows and torch's GEMM
  above. Its `rms_norm` adds into the residual in place: the model never reads a residual twice.

`layer_ops(device, dtype)` says which one runs; the runner passes it in each `ForwardBatch`.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from pd_serve.kernels import cpu_ops, ops


class LayerOps(Protocol):
    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x [M, K] @ weight [N, K]^T (+ bias) -> [M, N]."""
        ...

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As `ops.rms_norm`; the residual passed in may be reused for the one returned."""
        ...

    def qkv_rotary(
        self, qkv: torch.Tensor, num_heads: int, num_kv_heads: int, positions: torch.Tensor, cos_sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """qkv [T, (H + 2 KH) D] -> q [T, H, D], k [T, KH, D] (both rotated and contiguous), v [T, KH, D]."""
        ...

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[M, 2I] -> silu(first half) * second half, [M, I]."""
        ...


class TorchLayerOps:
    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.rms_norm(x, weight, eps, residual)

    def qkv_rotary(
        self, qkv: torch.Tensor, num_heads: int, num_kv_heads: int, positions: torch.Tensor, cos_sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, d = qkv.shape[0], cos_sin.shape[1]
        q, k, v = qkv.split([num_heads * d, num_kv_heads * d, num_kv_heads * d], dim=-1)
        q = q.reshape(n, num_heads, d).contiguous()
        k = k.reshape(n, num_kv_heads, d).contiguous()
        ops.rotary(q, k, positions, cos_sin)
        return q, k, v.reshape(n, num_kv_heads, d)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


class CpuLayerOps:
    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.shape[0] > cpu_ops.LINEAR_MAX_ROWS or not x.is_contiguous():
            return F.linear(x, weight, bias)
        return cpu_ops.linear(x, weight, bias)

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return cpu_ops.rms_norm(x, weight, eps, residual)

    def qkv_rotary(
        self, qkv: torch.Tensor, num_heads: int, num_kv_heads: int, positions: torch.Tensor, cos_sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return cpu_ops.qkv_rotary(qkv, num_heads, num_kv_heads, positions, cos_sin)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return cpu_ops.silu_mul(gate_up)


TORCH_LAYER_OPS = TorchLayerOps()
CPU_LAYER_OPS = CpuLayerOps()


def layer_ops(device: torch.device, dtype: torch.dtype) -> LayerOps:
    """The C kernels for float32 on the CPU where they built; torch (and Triton on CUDA) otherwise."""
    return CPU_LAYER_OPS if cpu_ops.supports(device, dtype) else TORCH_LAYER_OPS
