"""A Hugging Face tokenizer (tokenizer.json, tokenizer_config.json) built from a GGUF file's metadata.

A GGUF carries its tokenizer as metadata under llama.cpp's keys: the vocabulary, each token's type,
the merges (or sentencepiece scores), the special token ids and the chat template. We rebuild the
tokenizer llama.cpp runs from them with the `tokenizers` library:
- `tokenizer.ggml.model = "gpt2"`: byte-level BPE; `tokenizer.ggml.pre` picks how text is split
  before the merges (llama.cpp's pre-tokenizer names; an unknown one is refused, never guessed).
- `tokenizer.ggml.model = "llama"`: sentencepiece-style BPE with byte fallback, merges from the file
  or derived from the token scores.
Control tokens become special added tokens and user-defined ones plain added tokens, so both stay
whole. Nothing here reads tensors or writes anywhere but the directory it is given.

Calls: `read_vocab(gguf_file)` -> `GGUFVocab`, then `write_tokenizer(vocab, directory)`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pd_serve.model.gguf_file import GGUFFile

if TYPE_CHECKING:
    from tokenizers import Tokenizer

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # llama.cpp's token types
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> how text is split before byte-level BPE: "gpt2" (GPT-2's own regex),
# "digits" (each digit alone, then GPT-2's regex), or a regex that replaces GPT-2's
BYTE_LEVEL_SPLITS = {
    "default": "gpt2", "gpt2": "gpt2", "gpt-2": "gpt2", "mpt": "gpt2", "olmo": "gpt2",
    "smollm": "digits", "starcoder": "digits", "refact": "digits", "codeshell": "digits",
    "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}  # fmt: skip


@dataclass(frozen=True)
class GGUFVocab:
    """The tokenizer metadata of one GGUF file."""

    source: str  # the file, for error messages
    model: str  # tokenizer.ggml.model
    pre: str  # tokenizer.ggml.pre ("default" when absent)
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    scores: list[float]
    special_ids: dict[str, int]  # bos, eos, unk, pad, eot -> token id (those the file names)
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    chat_template: str | None

    def token(self, role: str) -> str | None:
        token_id = self.special_ids.get(role)
        return self.tokens[token_id] if token_id is not None else None

    @property
    def eos_ids(self) -> list[int]:
        """Every id that ends a generation: eos, and end-of-turn where the file names one."""
        return sorted({self.special_ids[k] for k in ("eos", "eot", "eom") if k in self.special_ids})


def read_vocab(gf: GGUFFile) -> GGUFVocab:
    model = gf.field("tokenizer.ggml.model", None)
    if model is None:
        raise gf.error(
            "metadata field 'tokenizer.ggml.model' is missing: the file carries no tokenizer, and pd-serve "
            "builds the tokenizer from the GGUF; use a GGUF converted with its tokenizer "
            "(llama.cpp's convert_hf_to_gguf.py)"
        )
    if model not in ("gpt2", "llama"):
        raise gf.error(
            f"tokenizer.ggml.model = {model!r} is not supported; "
            "supported: 'gpt2' (BPE), 'llama' (sentencepiece)"
        )
    tokens = [str(t) for t in gf.field("tokenizer.ggml.tokens")]
    types = [int(t) for t in gf.field("tokenizer.ggml.token_type", [NORMAL] * len(tokens))]
    special = {}
    for role in ("bos", "eos", "unk", "pad", "eot", "eom"):
        key = (
            f"tokenizer.ggml.{'unknown' if role == 'unk' else 'padding' if role == 'pad' else role}_token_id"
        )
        token_id = gf.field(key, None)
        if token_id is not None:
            if not 0 <= int(token_id) < len(tokens):
                raise gf.error(f"metadata field {key!r} = {token_id} is outside the {len(tokens)} tokens")
            special[role] = int(token_id)
    return GGUFVocab(
        source=str(gf.path),
        model=model,
        pre=str(gf.field("tokenizer.ggml.pre", "default")),
        tokens=tokens,
        token_types=types,
        merges=[str(m) for m in gf.field("tokenizer.ggml.merges", [])],
        scores=[float(s) for s in gf.field("tokenizer.ggml.scores", [])],
        special_ids=special,
        add_bos=bool(gf.field("tokenizer.ggml.add_bos_token", model == "llama")),
        add_eos=bool(gf.field("tokenizer.ggml.add_eos_token", False)),
        add_space_prefix=bool(gf.field("tokenizer.ggml.add_space_prefix", model == "llama")),
        chat_template=gf.field("tokenizer.chat_template", None),
    )


def build_tokenizer(vocab: GGUFVocab) -> Tokenizer:
    tok = _byte_level(vocab) if vocab.model == "gpt2" else _sentencepiece(vocab)
    _add_special_tokens(tok, vocab)
    _set_post_processor(tok, vocab)
    return tok


def tokenizer_config(vocab: GGUFVocab, max_length: int) -> dict[str, Any]:
    """tokenizer_config.json: transformers then uses tokenizer.json as it stands (no class of its own)."""
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": vocab.add_bos,
        "add_eos_token": vocab.add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
    }
    for role in ("bos", "eos", "unk", "pad"):
        if vocab.token(role) is not None:
            config[f"{role}_token"] = vocab.token(role)
    if vocab.chat_template:
        config["chat_template"] = vocab.chat_template
    return config


def write_tokenizer(vocab: GGUFVocab, out: Path, max_length: int) -> None:
    build_tokenizer(vocab).save(str(out / "tokenizer.json"))
    config = tokenizer_config(vocab, max_length)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))


def _error(vocab: GGUFVocab, what: str) -> ValueError:
    from pd_serve.model.gguf_file import GGUFError

    return GGUFError(f"{vocab.source}: {what}")


def byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character map, in which byte-level BPE vocabularies are spelled."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = chr(256 + n)
    return chars


def _vocab_ids(tokens: list[str]) -> dict[str, int]:
    ids: dict[str, int] = {}
    for i, t in enumerate(tokens):
        ids.setdefault(t, i)  # a token listed twice keeps its first id, as llama.cpp's lookup does
    return ids


def _byte_level(vocab: GGUFVocab) -> Tokenizer:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    split = BYTE_LEVEL_SPLITS.get(vocab.pre)
    if split is None:
        raise _error(
            vocab,
            f"tokenizer.ggml.pre = {vocab.pre!r} is not a pre-tokenizer pd-serve knows; "
            f"known: {', '.join(sorted(BYTE_LEVEL_SPLITS))}",
        )
    if not vocab.merges:
        raise _error(
            vocab, "metadata field 'tokenizer.ggml.merges' is missing or empty; a BPE tokenizer needs it"
        )
    chars = byte_chars()
    alphabet = set(chars.values())
    spelled = [
        t if kind != NORMAL or set(t) <= alphabet else "".join(chars[b] for b in t.encode())
        for t, kind in zip(vocab.tokens, vocab.token_types)
    ]
    merges = _merge_pairs(vocab)
    tok = Tokenizer(models.BPE(_vocab_ids(spelled), merges, ignore_merges=split == _LLAMA3_SPLIT))
    if split == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        first = Regex(r"\p{N}" if split == "digits" else split)
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(first, behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split == "digits"),
        ])  # fmt: skip
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece(vocab: GGUFVocab) -> Tokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    merges = _merge_pairs(vocab) or _merges_from_scores(vocab)
    unk = vocab.token("unk")
    model = models.BPE(_vocab_ids(vocab.tokens), merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    tok = Tokenizer(model)
    prepend = "first" if vocab.add_space_prefix else "never"
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if vocab.add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def _merge_pairs(vocab: GGUFVocab) -> list[tuple[str, str]]:
    """tokenizer.ggml.merges ('left right' strings) as pairs."""
    pairs = []
    for merge in vocab.merges:
        left, space, right = merge.partition(" ")
        if not space:
            raise _error(vocab, f"tokenizer.ggml.merges holds {merge!r}, not two tokens; the file is corrupt")
        pairs.append((left, right))
    return pairs


def _merges_from_scores(vocab: GGUFVocab) -> list[tuple[str, str]]:
    """Sentencepiece files may list scores and no merges: every split of a normal token into two known
    tokens is a merge, ranked by the merged token's score (higher first), ties by the parts' ids."""
    if len(vocab.scores) != len(vocab.tokens):
        raise _error(
            vocab,
            "metadata field 'tokenizer.ggml.scores' is missing or does not match the tokens, and "
            "there are no merges; a sentencepiece tokenizer needs one of them",
        )
    ids = _vocab_ids(vocab.tokens)
    ranked = []
    for token, score, kind in zip(vocab.tokens, vocab.scores, vocab.token_types):
        if kind not in (NORMAL, USER_DEFINED):
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ids and right in ids:
                ranked.append((-score, ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _add_special_tokens(tok: Tokenizer, vocab: GGUFVocab) -> None:
    from tokenizers import AddedToken

    control = [t for t, kind in zip(vocab.tokens, vocab.token_types) if kind == CONTROL]
    user = [t for t, kind in zip(vocab.tokens, vocab.token_types) if kind == USER_DEFINED]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])


def _set_post_processor(tok: Tokenizer, vocab: GGUFVocab) -> None:
    from tokenizers import processors

    first = [("bos", vocab.token("bos"))] if vocab.add_bos and vocab.token("bos") is not None else []
    last = [("eos", vocab.token("eos"))] if vocab.add_eos and vocab.token("eos") is not None else []
    if not first and not last:
        return
    pre, post = [t for _, t in first], [t for _, t in last]
    single = [*pre, "$A", *post]
    pair = [*pre, "$A", *post, *pre, "$B:1", *post]
    specials = [(t, vocab.special_ids[role]) for role, t in (*first, *last) if t is not None]
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
