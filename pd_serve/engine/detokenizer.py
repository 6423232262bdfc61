"""Incremental detokenization with stop strings.

Text is decoded over a small window of recent tokens; a delta is released only once it no longer
ends in an incomplete UTF-8 sequence (U+FFFD), so multi-byte characters split over tokens come out
whole. Stop strings are searched in the text as it grows; the last `max_stop_len - 1` characters
are held back until the request finishes, so no part of a stop string is ever streamed.
"""

from __future__ import annotations

from collections.abc import Callable

DecodeFn = Callable[..., str]  # decode(ids, skip_special_tokens=...) -> str

_CONTEXT_TOKENS = 5  # prompt tokens decoded with the first output tokens (leading-space rules)


class IncrementalDetokenizer:
    def __init__(self, decode: DecodeFn, prompt_token_ids: list[int], stop: tuple[str, ...], skip_special_tokens: bool) -> None:
        self._decode = decode
        self.ids: list[int] = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.skip_special = skip_special_tokens
        self.text = ""
        self.released = 0  # characters of `text` already handed out

    def add(self, token_id: int) -> str | None:
        """Append a token; returns the stop string if the text now contains one (text is cut before it)."""
        self.ids.append(token_id)
        decode = self._decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=self.skip_special)
        full = decode(self.ids[self.prefix_offset :], skip_special_tokens=self.skip_special)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return None
        before = len(self.text)
        self.text += full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._find_stop(before)

    def _find_stop(self, before: int) -> str | None:
        best: tuple[int, str] | None = None
        for s in self.stop:
            i = self.text.find(s, max(0, before - len(s) + 1))
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        self.text = self.text[: best[0]]
        return best[1]

    def release(self, finished: bool) -> str:
        """Text not yet handed out; while running, the tail that could start a stop string is held."""
        end = len(self.text) if finished else max(self.released, len(self.text) - self.hold)
        delta = self.text[self.released : end]
        self.released = end
        return delta
