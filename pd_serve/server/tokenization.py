"""Chat template rendering and tokenization in the API process, on one worker thread.

The Hugging Face tokenizer is loaded once (slowly: it imports transformers) and then used only from
one dedicated thread, so the event loop never waits on it and the tokenizer is never entered by two
threads at once. Prompts are tokenized the way the offline `LLM` does (`tokenizer.encode`, special
tokens as the tokenizer adds them); a rendered chat already carries its special tokens, so it is
encoded without adding more.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from pd_serve.server.errors import bad_request

T = TypeVar("T")


class Tokenization:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pd-serve-tokenize")

    @classmethod
    def load(cls, model_dir: Path) -> Tokenization:
        """Blocking: call it from a thread (it imports transformers)."""
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(model_dir)))

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def encode(self, text: str) -> list[int]:
        return await self._run(self._encode, text)

    async def render_chat(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> list[int]:
        """Token ids of the chat as the model's template renders it; 400 if the template refuses it."""
        return await self._run(self._render_chat, list(messages), add_generation_prompt)

    async def token_strings(self, token_ids: Sequence[int]) -> list[str]:
        """Each token's text on its own (for logprobs)."""
        return await self._run(self._token_strings, list(token_ids))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- on the tokenizer thread --------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)]

    def _render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise bad_request("messages", "this model has no chat template; use /v1/completions")
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as exc:  # jinja raises what the template author chose (TemplateError, ...)
            raise bad_request("messages", f"the chat template refused these messages: {exc}") from exc
        return [int(t) for t in self.tokenizer.encode(text, add_special_tokens=False)]

    def _token_strings(self, token_ids: list[int]) -> list[str]:
        return [self.tokenizer.decode([t]) for t in token_ids]
