"""The built-in demo model: a small Llama in Hugging Face format, created deterministically on first use.

`--model demo` resolves (source.py) to a directory under the pd-serve cache (`$PD_SERVE_CACHE`,
default `~/.cache/pd-serve`). The directory is built once, atomically (several processes may race to build
it), with a byte-level BPE tokenizer trained on text generated here and a chat template, so that
`transformers.AutoModelForCausalLM.from_pretrained` loads it too. The weights are random (seeded).
"""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pd_serve.model.source import cache_root

DEMO_VERSION = "v1"
SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
DEMO_CONFIG: dict[str, Any] = {
    "vocab_size": 2048,
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "initializer_range": 0.05,
}

_WORDS = {
    "subject": ["the model", "a request", "the decode node", "the prefill node", "every page", "the scheduler", "a user", "the cache", "the frontend", "one token"],
    "verb": ["moves", "writes", "reads", "waits for", "sends", "streams", "frees", "keeps", "finds", "builds"],
    "object": ["the next token", "a page of keys", "its values", "the first token", "the prompt", "a batch of requests", "the room", "memory", "the answer", "a short story"],
    "tail": ["quickly", "on time", "over the network", "in one step", "without a copy", "after the prefill", "before the timeout", "in order"],
}


def ensure_demo_model(root: Path | None = None) -> Path:
    target = (root or cache_root()) / f"demo-{DEMO_VERSION}"
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-build-", dir=target.parent))
    try:
        _build_demo(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process built it first
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def demo_corpus(num_sentences: int = 4000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(num_sentences):
        words = [rng.choice(_WORDS[k]) for k in ("subject", "verb", "object", "tail")]
        lines.append(" ".join(words).capitalize() + rng.choice([".", ".", "!", "?"]))
    return lines


def _build_demo(out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=DEMO_CONFIG["vocab_size"],
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(demo_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|eos|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)

    ids: dict[str, int] = {}
    for t in ("<|bos|>", "<|eos|>", "<|end|>"):
        token_id = tok.token_to_id(t)
        assert token_id is not None, f"special token {t} missing from the trained vocabulary"
        ids[t] = token_id
    # The trained vocabulary is smaller than the target on this corpus; the model matches it exactly.
    config = LlamaConfig(
        **{**DEMO_CONFIG, "vocab_size": len(fast)},
        bos_token_id=ids["<|bos|>"],
        eos_token_id=[ids["<|eos|>"], ids["<|end|>"]],
        pad_token_id=ids["<|eos|>"],
        dtype="float32",
    )
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
