"""Model code: Hugging Face config -> our Llama-family model on the paged KV cache, its loader, and
what `--model` names (source.py): the demo model, GGUF files converted once into the cache, smollm2.

Nothing here schedules requests or owns KV pages; the model reads and writes the pools it is given
through the attention metadata of one forward pass.
"""
