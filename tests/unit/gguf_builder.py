"""Small GGUF files the tests write themselves with `gguf.GGUFWriter`, as llama.cpp's converter would.

Random Llama-family weights (wide init, so greedy decoding has clear winners), a byte-level BPE
tokenizer trained here, control tokens and a ChatML template in the metadata. Weights go in the
GGUF type asked for: float types and the quantizations `gguf.quants.quantize` implements are made
from the weights; k-quants (which it only dequantizes) are random blocks with sane scales. For the
llama architecture the q/k rows are permuted exactly as llama.cpp's converter does, so a loader that
forgets to undo it fails the parity tests.

`write_gguf(path, TinySpec(...))` -> the weights in the Hugging Face layout, as the file holds them.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "the scheduler moves pages of keys and values to the decode node",
    "a request waits for its first token, then streams the answer back in order",
    "What is the capital of France? Paris is the capital of France.",
    "numbers like 12345 and 2024 are split into digits; punctuation stays: hello, world!",
]
# k-quant block layouts (bytes per 256 values, offsets of the f16 scale d and min dmin)
_KQUANT = {
    "Q2_K": (84, 80, 82),
    "Q3_K": (110, 108, None),
    "Q4_K": (144, 0, 2),
    "Q5_K": (176, 0, 2),
    "Q6_K": (210, 208, None),
}
QUANTIZABLE = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")  # by gguf.quants.quantize


@dataclass(frozen=True)
class TinySpec:
    arch: str = "llama"  # general.architecture
    qtype: str = "F32"  # every 2D weight, unless `types` names its own
    types: dict[str, str] = field(
        default_factory=dict
    )  # tensor kind (token_embd, attn_q, ffn_down, ...) -> type
    hidden: int = 64
    intermediate: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int | None = None  # None: hidden // heads
    tied: bool = True
    tokenizer: bool = True
    context: int = 256
    seed: int = 0

    @property
    def dim(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def type_of(self, kind: str) -> str:
        return self.types.get(kind, self.qtype)


@functools.lru_cache(maxsize=1)
def tiny_vocab() -> tuple[list[str], list[str]]:
    """(tokens in id order, merges as 'a b'), the specials first, as a gpt2-model GGUF stores them."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


def hf_weights(spec: TinySpec, vocab: int) -> dict[str, np.ndarray]:
    """GGUF tensor name -> float32 weight in the Hugging Face layout (q/k not yet permuted)."""
    rng = np.random.default_rng(spec.seed)
    h, i, q, kv = spec.hidden, spec.intermediate, spec.heads * spec.dim, spec.kv_heads * spec.dim
    shapes = {"attn_q": (q, h), "attn_k": (kv, h), "attn_v": (kv, h), "attn_output": (h, q),
              "ffn_gate": (i, h), "ffn_up": (i, h), "ffn_down": (h, i)}  # fmt: skip
    out = {
        "token_embd.weight": rng.normal(0, 0.5, (vocab, h)),
        "output_norm.weight": 1 + rng.normal(0, 0.1, h),
    }
    if not spec.tied:
        out["output.weight"] = rng.normal(0, 0.2, (vocab, h))
    for n in range(spec.layers):
        b = f"blk.{n}"
        out |= {f"{b}.{k}.weight": rng.normal(0, 0.2, shape) for k, shape in shapes.items()}
        out |= {
            f"{b}.attn_norm.weight": 1 + rng.normal(0, 0.1, h),
            f"{b}.ffn_norm.weight": 1 + rng.normal(0, 0.1, h),
        }
        if spec.arch == "qwen2":
            out |= {
                f"{b}.attn_{p}.bias": rng.normal(0, 0.2, n_) for p, n_ in (("q", q), ("k", kv), ("v", kv))
            }
        if spec.arch == "qwen3":
            out |= {f"{b}.attn_{p}_norm.weight": 1 + rng.normal(0, 0.1, spec.dim) for p in "qk"}
    return {k: v.astype(np.float32) for k, v in out.items()}


def permute_like_llama_cpp(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (rotary halves -> interleaved pairs)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def encode(w: np.ndarray, qtype: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(what the file stores, the float32 values it dequantizes to)."""
    import gguf

    kind = gguf.GGMLQuantizationType[qtype]
    if qtype in _KQUANT:
        raw = _random_kquant_blocks(w.shape, qtype, rng)
    elif qtype in QUANTIZABLE:
        raw = gguf.quants.quantize(w, kind)
    else:  # a type gguf can only read: random blocks (the loader must refuse it before reading them)
        elems, size = gguf.GGML_QUANT_SIZES[kind]
        raw = rng.integers(0, 256, (w.shape[0], w.shape[1] // elems * size), dtype=np.uint8)
        return raw, np.zeros_like(w)
    return raw, gguf.quants.dequantize(raw, kind).reshape(w.shape).astype(np.float32)


def _random_kquant_blocks(shape: tuple[int, ...], qtype: str, rng: np.random.Generator) -> np.ndarray:
    import gguf

    size, d_at, dmin_at = _KQUANT[qtype]
    blocks = rng.integers(0, 256, (shape[0], shape[1] // 256, size), dtype=np.uint8)
    for scale, at in ((1.0, d_at), (1.0, dmin_at)):
        if at is not None:
            blocks[..., at : at + 2] = np.frombuffer(np.float16(scale).tobytes(), np.uint8)
    raw = blocks.reshape(shape[0], -1)
    std = float(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]).std())
    for at in (d_at, dmin_at):  # values are linear in d and dmin: scale both to a std of about 0.2
        if at is not None:
            blocks[..., at : at + 2] = np.frombuffer(np.float16(0.2 / std).tobytes(), np.uint8)
    return blocks.reshape(shape[0], -1)


def write_gguf(path: Path, spec: TinySpec) -> dict[str, np.ndarray]:
    """Write the file; returns GGUF tensor name -> the float32 weight it holds, in Hugging Face layout."""
    import gguf

    tokens, merges = tiny_vocab()
    w = gguf.GGUFWriter(str(path), spec.arch)
    _write_metadata(w, spec, len(tokens))
    if spec.tokenizer:
        _write_tokenizer(w, tokens, merges)
    rng = np.random.default_rng(spec.seed + 1)
    held = {}
    for name, weight in hf_weights(spec, len(tokens)).items():
        kind = name.split(".")[-2] if name.startswith("blk.") else name.split(".")[0]
        qtype = spec.type_of(kind) if weight.ndim == 2 else "F32"
        permuted = spec.arch == "llama" and kind in ("attn_q", "attn_k")
        heads = spec.heads if kind == "attn_q" else spec.kv_heads
        raw, values = encode(permute_like_llama_cpp(weight, heads) if permuted else weight, qtype, rng)
        held[name] = _unpermute(values, heads) if permuted else values
        w.add_tensor(
            name, raw, raw_dtype=None if qtype in ("F32", "F16") else gguf.GGMLQuantizationType[qtype]
        )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_metadata(w, spec: TinySpec, vocab: int) -> None:  # noqa: ANN001 (a gguf.GGUFWriter)
    w.add_block_count(spec.layers)
    w.add_context_length(spec.context)
    w.add_embedding_length(spec.hidden)
    w.add_feed_forward_length(spec.intermediate)
    w.add_head_count(spec.heads)
    w.add_head_count_kv(spec.kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(spec.dim)
    w.add_vocab_size(vocab)
    if spec.head_dim is not None:
        w.add_key_length(spec.head_dim)
        w.add_value_length(spec.head_dim)


def _write_tokenizer(w, tokens: list[str], merges: list[str]) -> None:  # noqa: ANN001 (a gguf.GGUFWriter)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(SPECIALS.index("<|im_start|>"))
    w.add_eos_token_id(SPECIALS.index("<|im_end|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)


SPM_WORDS = ("the", "scheduler", "moves", "pages", "hello", "world", "token")


def spm_vocab() -> tuple[list[str], list[float], list[int]]:
    """A sentencepiece-style vocabulary (tokens, scores, types) without merges, as llama-model GGUFs store it:
    <unk>, <s>, </s>, the 256 byte tokens, then pieces scored so that shorter ones merge first."""
    pieces: list[str] = ["▁"]
    for word in SPM_WORDS:
        for c in word:
            pieces.append(c) if c not in pieces else None
    for word in SPM_WORDS:
        for k in range(1, len(word) + 1):
            if f"▁{word[:k]}" not in pieces:
                pieces.append(f"▁{word[:k]}")
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    types = [2, 3, 3, *([6] * 256), *([1] * len(pieces))]
    scores = [0.0, 0.0, 0.0, *([0.0] * 256), *(-float(len(p)) - i / 1000 for i, p in enumerate(pieces))]
    return tokens, scores, types


def write_spm_gguf(path: Path) -> None:
    """A tiny llama GGUF whose tokenizer is sentencepiece-style (tokenizer.ggml.model = llama)."""
    import gguf

    tokens, scores, types = spm_vocab()
    spec = TinySpec(tokenizer=False)
    w = gguf.GGUFWriter(str(path), "llama")
    _write_metadata(w, spec, len(tokens))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(True)
    for name, weight in hf_weights(spec, len(tokens)).items():
        w.add_tensor(name, weight)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
