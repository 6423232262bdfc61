"""The engine decodes with `tokenizers` straight from tokenizer.json where transformers would use that
file as it stands: the same text and eos token as transformers' tokenizer, without importing
transformers (seconds of every node's start); any other tokenizer class still goes through
transformers. The API process starts its engine without importing torch."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

from transformers import AutoTokenizer

from pd_serve.engine.tokenizer import eos_token_ids, verbatim_eos_id, verbatim_tokenizer
from pd_serve.model.config import load_model_config


def test_verbatim_decoding_and_eos_equal_transformers(demo_dir: Path) -> None:
    verbatim, reference = verbatim_tokenizer(demo_dir), AutoTokenizer.from_pretrained(str(demo_dir))
    assert verbatim is not None
    assert verbatim_eos_id(demo_dir, verbatim) == reference.eos_token_id is not None
    special = list(reference.all_special_ids)
    rng = random.Random()
    for _ in range(200):
        ids = [rng.choice(special) if rng.random() < 0.2 else rng.randrange(len(reference)) for _ in range(rng.randint(1, 24))]
        for skip in (True, False):
            assert verbatim.decode(ids, skip_special_tokens=skip) == reference.backend_tokenizer.decode(
                ids, skip_special_tokens=skip
            ), (ids, skip)


def test_another_tokenizer_class_goes_through_transformers(demo_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "model"
    shutil.copytree(demo_dir, other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "LlamaTokenizerFast"}))
    assert verbatim_tokenizer(other) is None
    (other / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": {"content": "<|bos|>"}}))
    verbatim = verbatim_tokenizer(other)
    assert verbatim is not None and verbatim_eos_id(other, verbatim) == verbatim.token_to_id("<|bos|>")
    eos = verbatim_eos_id(other, verbatim)
    assert eos in eos_token_ids(other, load_model_config(other), eos)


def test_the_engine_starts_without_transformers_and_the_api_side_without_torch(demo_dir: Path) -> None:
    code = """
import sys
import pd_serve.engine.client, pd_serve.server.app, pd_serve.server.backend, pd_serve.server.roles
api = sorted(m for m in ("torch", "transformers") if m in sys.modules)
from pd_serve.config import EngineConfig
from pd_serve.engine.core import EngineCore
core = EngineCore(EngineConfig(model="demo", max_total_tokens=256))
print(api, "transformers" in sys.modules, core.eos_ids, flush=True)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    reference = AutoTokenizer.from_pretrained(str(demo_dir))
    assert done.stdout.split(" ", 2)[:2] == ["[]", "False"], done.stdout + done.stderr
    assert str(reference.eos_token_id) in done.stdout.split(" ", 2)[2]
