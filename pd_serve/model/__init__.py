"""Model code: Hugging Face config -> our Llama-family model on the paged KV cache, and its loader.

Nothing here schedules requests or owns KV pages; the model reads and writes the pools it is given
through the attention metadata of one forward pass.
"""
