"""Compute kernels for the engine's hot paths, each a torch reference beside (on GPU) a Triton kernel.

Every public op here has one signature shared by its torch reference and its Triton wrapper. This
package imports nothing from the rest of pd_serve.

KV layout (the contract with the transfer layer): per layer one K pool and one V pool, each
`[num_pages, page_size, num_kv_heads, head_dim]`. A token's slot is `page_id * page_size + offset`.
"""
