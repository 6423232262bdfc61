"""Compute kernels for the engine's hot paths, each a torch reference beside a Triton kernel.

Every public op has one signature shared by its torch reference (`reference.py`, `*_ref`) and its
Triton wrapper (`triton_*.py`, `*_triton`). The engine calls the dispatch functions in `ops.py`,
which pick Triton on CUDA tensors and the reference otherwise (PD_SERVE_KERNELS=auto|torch|triton,
`ops.set_backend`, `ops.use_backend`). This package imports nothing from the rest of pd_serve, and
only the `triton_*` modules (loaded on first use) import triton.

On the CPU in float32 the engine runs C kernels instead where a compiler is found (`cpu_build`):
decode attention through the page table (`cpu_native`) and the decoder layer's dense ops
(`cpu_ops`: linear for few rows, RMSNorm, rotary, SiLU-mul, store_kv). `layer_ops` picks, once per
forward pass, between those and `ops`/torch; the GPU path always takes `ops`.

KV layout (the contract with the transfer layer): per layer one K pool and one V pool, each
`[num_pages, page_size, num_kv_heads, head_dim]`. A token's slot is `page_id * page_size + offset`.
Call order in a forward: `store_kv` writes the new tokens' K/V first; the attention ops then read
every context token, the new ones included, from the pools.
"""
