"""The offline API: `LLM(model="demo", **engine_options).generate(prompts, params)`.

Runs an `EngineCore` in this process (no server, no ZMQ); prompts are strings (tokenized with the
model's tokenizer, special tokens added as the tokenizer does) or lists of token ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from pd_serve.config import EngineConfig
from pd_serve.engine.core import EngineCore
from pd_serve.engine.outputs import RequestOutput
from pd_serve.engine.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str = "demo", config: EngineConfig | None = None, **engine_options: Any) -> None:
        """Either engine options as keywords, or a whole `config` (then `model` is taken from it)."""
        self.engine = EngineCore(config if config is not None else EngineConfig(model=model, **engine_options))
        self.tokenizer = self.engine.tokenizer
        self._counter = 0

    def generate(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]] | str,
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        if isinstance(prompts, str):
            prompts = [prompts]
        token_lists = [self._tokenize(p) for p in prompts]
        if params is None:
            params = SamplingParams()
        param_list = [params] * len(token_lists) if isinstance(params, SamplingParams) else list(params)
        if len(param_list) != len(token_lists):
            raise ValueError(f"params: got {len(param_list)} SamplingParams for {len(token_lists)} prompts")
        outputs: dict[str, RequestOutput] = {}
        for ids, p in zip(token_lists, param_list):
            rid = f"offline-{self._counter}"
            self._counter += 1
            self.engine.add_request(rid, ids, p)
            outputs[rid] = RequestOutput(rid, ids)
        with tqdm(total=len(outputs), desc="Generating", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished():
                for delta in self.engine.step():
                    out = outputs.get(delta.request_id)
                    if out is None:
                        continue
                    out.apply(delta)
                    if delta.finished:
                        bar.update(1)
        return list(outputs.values())

    def _tokenize(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer.encode(prompt))
        return [int(t) for t in prompt]
