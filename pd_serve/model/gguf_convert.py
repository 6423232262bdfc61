"""A GGUF file -> a Hugging Face model directory in the pd-serve cache, converted once and reused.

The cache entry is `<cache>/gguf/<stem>-<size>-<sha256[:16]>-<dtype>/`: safetensors weights in the
serving dtype (dequantized with the `gguf` package), config.json, generation_config.json,
tokenizer.json and tokenizer_config.json (with the chat template), and gguf_source.json naming the
file it came from. `loader.py` and the tokenizer code then read it like any model directory.

`ensure_gguf_model(path, dtype)`:
- hashes the file; an entry under that key is returned at once (the second start takes seconds)
- otherwise validates the whole file first (metadata, tokenizer, every tensor's name, shape and
  type): a bad file is refused before anything is written to the cache
- takes the entry's lock (processes that start together, such as a node's API and engine processes,
  convert once; the others wait and reuse), converts into `.<key>.tmp-*` and renames that into
  place, so a crash or an error never leaves a half-written entry where a later start would read it
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pd_serve.model.gguf_file import GGUFFile, HFTensor, open_gguf
from pd_serve.model.gguf_tokenizer import GGUFVocab, read_vocab, write_tokenizer

log = logging.getLogger(__name__)
CONVERTED_DTYPES = ("float32", "bfloat16", "float16")
SHARD_BYTES = 2 << 30  # one safetensors file per ~2 GiB, so a big model is never held twice in memory
_HASH_CHUNK = 16 << 20


def serving_dtype(dtype: str, device: str) -> str:
    """`--dtype` as the weights are stored: auto is float32 on the CPU and bfloat16 on a GPU."""
    if dtype == "auto":
        return "float32" if device == "cpu" else "bfloat16"
    return dtype


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def cache_key(path: Path, dtype: str) -> str:
    return f"{path.stem}-{path.stat().st_size}-{file_sha256(path)[:16]}-{dtype}"


def is_converted(entry: Path) -> bool:
    return (entry / "config.json").is_file() and (entry / "tokenizer.json").is_file()


def ensure_gguf_model(path: str | Path, dtype: str, root: Path, show_progress: bool = True) -> Path:
    """The converted directory for the GGUF at `path` in `dtype` (float32, bfloat16 or float16)."""
    path = Path(path)
    if dtype not in CONVERTED_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(CONVERTED_DTYPES)} (--dtype)")
    if not path.is_file():
        open_gguf(path)  # raises the error naming the path
    entry = root / "gguf" / cache_key(path, dtype)
    if is_converted(entry):
        return entry
    plan = ConversionPlan.of(open_gguf(path))
    with _locked(entry):
        if is_converted(entry):  # another process converted it while we waited
            return entry
        _remove_stale(entry)
        started = time.monotonic()
        log.info("converting %s to %s (%s); later starts reuse it", path, entry, dtype)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=entry.parent))
        try:
            plan.write(tmp, dtype, show_progress)
            tmp.chmod(0o755)  # mkdtemp's 0700 would hide the entry from other users of a shared cache
            tmp.rename(entry)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("converted %s in %.1f s", path.name, time.monotonic() - started)
    return entry


class ConversionPlan:
    """A validated GGUF file and what it converts to; `write` does the work."""

    def __init__(
        self, gf: GGUFFile, config: dict[str, Any], tensors: list[HFTensor], vocab: GGUFVocab
    ) -> None:
        self.gf, self.config, self.tensors, self.vocab = gf, config, tensors, vocab

    @classmethod
    def of(cls, gf: GGUFFile) -> ConversionPlan:
        from pd_serve.model.gguf_tokenizer import build_tokenizer

        config = gf.hf_config()
        tensors = gf.hf_tensors(config)
        vocab = read_vocab(gf)
        if len(vocab.tokens) > config["vocab_size"]:
            raise gf.error(
                f"tokenizer.ggml.tokens lists {len(vocab.tokens)} tokens, more than the model's "
                f"vocab_size {config['vocab_size']}; the file is corrupt"
            )
        build_tokenizer(vocab)  # a tokenizer that cannot be built is refused before any writing
        config |= {"bos_token_id": vocab.special_ids.get("bos"), "eos_token_id": _one_or_list(vocab.eos_ids)}
        return cls(gf, config, tensors, vocab)

    def write(self, out: Path, dtype: str, show_progress: bool) -> None:
        config = {**self.config, "torch_dtype": dtype}
        (out / "config.json").write_text(json.dumps(config, indent=2))
        generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
        (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
        write_tokenizer(self.vocab, out, config["max_position_embeddings"])
        _write_weights(self, out, dtype, show_progress)
        source = {"gguf": str(self.gf.path.resolve()), "size": self.gf.path.stat().st_size}
        (out / "gguf_source.json").write_text(json.dumps(source, indent=2))


def _one_or_list(ids: list[int]) -> int | list[int] | None:
    return None if not ids else ids[0] if len(ids) == 1 else ids


def _write_weights(plan: ConversionPlan, out: Path, dtype: str, show_progress: bool) -> None:
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm

    torch_dtype = getattr(torch, dtype)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for t in tqdm(
        plan.tensors, desc=f"Dequantizing {plan.gf.path.name}", unit="tensor", disable=not show_progress
    ):
        weight = dequantize(t, plan).to(torch_dtype)
        if size and size + weight.nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][t.hf_name] = weight
        size += weight.nbytes
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    if len(shards) == 1:
        names = ["model.safetensors"]
    for name, shard in zip(names, shards):
        save_file(shard, str(out / name), metadata={"format": "pt"})
    if len(shards) > 1:
        weight_map = {tensor: name for name, shard in zip(names, shards) for tensor in shard}
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1)
        )


def dequantize(t: HFTensor, plan: ConversionPlan):  # noqa: ANN201 (a float32 torch.Tensor)
    """One tensor in float32, in the Hugging Face layout (q/k rows un-permuted where llama.cpp
    permuted them)."""
    import numpy as np
    import torch
    from gguf.quants import dequantize as gguf_dequantize

    raw = t.tensor.data.view(
        np.ndarray
    )  # a plain view of the memory map: numpy's memmap subclass is slow here
    values = torch.from_numpy(gguf_dequantize(raw, t.tensor.tensor_type).reshape(t.shape).copy())
    if plan.gf.arch().permute_qk and t.hf_name.endswith(("q_proj.weight", "k_proj.weight")):
        heads = plan.config["num_attention_heads" if "q_proj" in t.hf_name else "num_key_value_heads"]
        values = unpermute_rope_rows(values, heads)
    return values


def unpermute_rope_rows(weight: Any, heads: int) -> Any:
    """Undo llama.cpp's q/k permutation: within each head, its converter moved the rows of the rotary
    pairs (i, i + d/2) next to each other (2i, 2i + 1); this puts them back into two halves."""
    rows = weight.shape[0]
    half = rows // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


@contextlib.contextmanager
def _locked(entry: Path) -> Iterator[None]:
    """One converter per cache entry across processes: an exclusive lock on `<entry>.lock`, released
    by the kernel should this process die, so a crash never leaves the entry locked."""
    from pd_serve.model.config import ModelConfigError

    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        handle = open(entry.parent / f".{entry.name}.lock", "a")  # noqa: SIM115 (held across the yield)
    except OSError as exc:
        raise ModelConfigError(
            f"{entry.parent}: cannot write the model cache ({exc}); set $PD_SERVE_CACHE "
            "to a writable directory"
        ) from exc
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _remove_stale(entry: Path) -> None:
    """Temporary directories of conversions that died (killed, crashed): ours to remove, as we hold
    the lock."""
    for stale in entry.parent.glob(f".{entry.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
