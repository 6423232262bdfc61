"""What the engine needs of the model's tokenizer: decoding, the eos token ids, and (for the
offline `LLM` only) the transformers tokenizer.

Where transformers would use tokenizer.json as it stands, `tokenizers` reads it directly, so the
engine process does not import transformers (3 to 4 s of every node's start). This module must
never import transformers at module level.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pd_serve.model.config import ModelConfig

# tokenizer classes whose transformers tokenizer is tokenizer.json as it stands (transformers 5)
VERBATIM_TOKENIZER_CLASSES = frozenset({"TokenizersBackend", "PreTrainedTokenizerFast"})


def load_tokenizer(model_dir: Path):  # noqa: ANN201 (a transformers tokenizer)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def _tokenizer_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "tokenizer_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    return config if isinstance(config, dict) else {}


def verbatim_tokenizer(model_dir: Path):  # noqa: ANN201 (a tokenizers.Tokenizer, or None)
    """The `tokenizers` tokenizer where transformers would use tokenizer.json as it stands; None
    otherwise (another tokenizer class, no tokenizer.json)."""
    path = model_dir / "tokenizer.json"
    if not path.is_file() or _tokenizer_config(model_dir).get("tokenizer_class") not in VERBATIM_TOKENIZER_CLASSES:
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def verbatim_eos_id(model_dir: Path, tokenizer: Any) -> int | None:
    """What transformers' `eos_token_id` would be: tokenizer_config's eos_token, as a token id."""
    eos = _tokenizer_config(model_dir).get("eos_token")
    if isinstance(eos, dict):  # a serialized AddedToken
        eos = eos.get("content")
    return tokenizer.token_to_id(eos) if isinstance(eos, str) else None


def eos_token_ids(model_dir: Path, model: ModelConfig, tokenizer_eos: int | None) -> frozenset[int]:
    ids = set(model.eos_token_ids)
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids |= set(eos) if isinstance(eos, list) else ({eos} if eos is not None else set())
    if tokenizer_eos is not None:
        ids.add(tokenizer_eos)
    return frozenset(ids)


class EngineTokenizer:
    """`decode` and `eos_ids` for the engine; `transformers` loads that tokenizer on first use."""

    def __init__(self, model_dir: Path, model: ModelConfig) -> None:
        self.model_dir = model_dir
        self._transformers: Any = None
        verbatim = verbatim_tokenizer(model_dir)
        if verbatim is not None:
            self.decode: Callable[..., str] = verbatim.decode
            tokenizer_eos = verbatim_eos_id(model_dir, verbatim)
        else:
            backend = getattr(self.transformers, "backend_tokenizer", None)
            self.decode = backend.decode if backend is not None else self.transformers.decode
            tokenizer_eos = getattr(self.transformers, "eos_token_id", None)
        self.eos_ids = eos_token_ids(model_dir, model, tokenizer_eos)

    @property
    def transformers(self):  # noqa: ANN201 (a transformers tokenizer)
        if self._transformers is None:
            self._transformers = load_tokenizer(self.model_dir)
        return self._transformers
