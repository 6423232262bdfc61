"""Batched sampling on the device: penalties, temperature, top-k, top-p, min-p, seeds, logprobs.

One call handles the whole batch with tensor ops; the only per-request loop draws the random noise
of requests that carry their own seed (each has its own generator, so equal seeds give equal
outputs whatever else is in the batch). Sampling uses the exponential race: argmax(p / E) with
E ~ Exp(1) draws from p. Logprobs are those of the model's raw distribution, before penalties and
temperature.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pd_serve.engine.request import Request


@dataclass
class TokenLogprobs:
    logprob: float  # of the sampled token
    top: list[tuple[int, float]]  # the top-N alternatives, best first


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


class Sampler:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sample(self, logits: torch.Tensor, requests: list[Request]) -> SamplerOutput:
        """logits [n, vocab] float32, one row per request."""
        if not requests:
            return SamplerOutput([], [])
        raw = logits
        params = [r.params for r in requests]
        if any(p.has_penalties for p in params):
            logits = self._penalize(logits.clone(), requests)
        if all(p.greedy for p in params):
            tokens = logits.argmax(dim=-1)
        else:
            tokens = self._random(logits, requests)
        token_list = tokens.tolist()
        return SamplerOutput(token_list, self._logprobs(raw, tokens, requests))

    def _penalize(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        n, vocab = logits.shape
        dev = self.device
        out_counts = torch.zeros(n, vocab, device=dev)
        seen = torch.zeros(n, vocab, dtype=torch.bool, device=dev)
        for i, r in enumerate(requests):
            if not r.params.has_penalties:
                continue
            if r.output_token_ids:
                out = torch.tensor(r.output_token_ids, device=dev)
                out_counts[i].index_add_(0, out, torch.ones(len(out), device=dev))
            seen[i, torch.tensor(r.all_token_ids, device=dev)] = True
        rep = self._column([r.params.repetition_penalty for r in requests])
        freq = self._column([r.params.frequency_penalty for r in requests])
        pres = self._column([r.params.presence_penalty for r in requests])
        penalized = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalized, logits)
        return logits - freq * out_counts - pres * (out_counts > 0).float()

    def _random(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        params = [r.params for r in requests]
        greedy = torch.tensor([p.greedy for p in params], device=self.device)
        temp = self._column([p.temperature if not p.greedy else 1.0 for p in params])
        scaled = logits / temp
        if any(p.top_k is not None or p.top_p < 1.0 for p in params):
            scaled = self._top_k_top_p(scaled, requests)
        probs = torch.softmax(scaled, dim=-1)
        if any(p.min_p > 0 for p in params):
            min_p = self._column([p.min_p for p in params])
            probs = probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
        noise = self._exponential(probs.shape, requests)
        sampled = (probs / noise).argmax(dim=-1)
        return torch.where(greedy, logits.argmax(dim=-1), sampled)

    def _top_k_top_p(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        vocab = logits.shape[-1]
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        k = torch.tensor([min(r.params.top_k or vocab, vocab) for r in requests], device=self.device)
        ranks = torch.arange(vocab, device=self.device)[None, :]
        drop = ranks >= k[:, None]
        probs = torch.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass strictly above each rank
        top_p = self._column([r.params.top_p for r in requests])
        drop |= before >= top_p  # keeps the smallest set whose mass reaches top_p (never empty)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        return torch.empty_like(logits).scatter_(-1, order, sorted_logits)

    def _exponential(self, shape: torch.Size, requests: list[Request]) -> torch.Tensor:
        noise = torch.empty(shape, device=self.device).exponential_()
        for i, r in enumerate(requests):
            if r.generator is not None:
                noise[i] = _seeded_noise(r.generator, shape[-1]).to(self.device)
        return noise.clamp_(min=1e-10)

    @staticmethod
    def skip_draw(request: Request, vocab_size: int) -> None:
        """Advance a seeded request's generator past the draw its first token took elsewhere (on
        the prefill node), so that its next tokens are those a colocated engine would sample."""
        if request.generator is not None and not request.params.greedy:
            _seeded_noise(request.generator, vocab_size)

    def _logprobs(self, raw: torch.Tensor, tokens: torch.Tensor, requests: list[Request]) -> list[TokenLogprobs | None]:
        want = [r.params.logprobs for r in requests]
        if all(w is None for w in want):
            return [None] * len(requests)
        logp = torch.log_softmax(raw, dim=-1)
        chosen = logp.gather(-1, tokens[:, None])[:, 0].tolist()
        top_n = max(w or 0 for w in want)
        top_vals, top_ids = (logp.topk(top_n, dim=-1) if top_n else (None, None))
        out: list[TokenLogprobs | None] = []
        for i, w in enumerate(want):
            if w is None:
                out.append(None)
                continue
            top = []
            if w and top_ids is not None and top_vals is not None:
                top = list(zip(top_ids[i, :w].tolist(), top_vals[i, :w].tolist()))
            out.append(TokenLogprobs(chosen[i], top))
        return out

    def _column(self, values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=self.device)[:, None]


def _seeded_noise(generator: torch.Generator, vocab_size: int) -> torch.Tensor:
    """One row of Exp(1) noise from a request's own generator (on the CPU, so equal seeds agree)."""
    return torch.empty(vocab_size).exponential_(generator=generator)
