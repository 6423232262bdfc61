"""EngineCore: one engine's state and its `step()`; used in-process by `LLM` and by the engine loop.

Every request that entered ends with exactly one finished `RequestDelta` (aborted and rejected
ones too). The core never asks which role it has: disaggregation lives behind `self.connector`
(`engine/connector.py`, whose docstring gives the hooks' order). Calls:
- `add_request`: validates; a request with `pd` goes to the connector, any other to the scheduler;
- `step`: the connector's events become deltas, then schedule, run the model, let the connector
  take the requests it hands over, and apply the other sampled tokens (stop checks, detokenization);
- `abort`: the connector says who ends the request (`AbortResult`).
"""

from __future__ import annotations

import logging
from dataclasses import asdict

import torch

from pd_serve.config import ConfigError, DisaggConfig, EngineConfig
from pd_serve.engine.connector import AbortResult, Event, KVSent, RoomFailed, make_connector
from pd_serve.engine.detokenizer import IncrementalDetokenizer
from pd_serve.engine.kv_cache import KVCache, num_pages_for
from pd_serve.engine.messages import EngineStats, PDSpec, RequestDelta, TokenLogprob
from pd_serve.engine.request import FinishReason, Request, RequestStatus
from pd_serve.engine.runner import ModelRunner
from pd_serve.engine.sampling_params import SamplingParams
from pd_serve.engine.scheduler import RequestRejected, ScheduleOutput, Scheduler, SchedulerConfig
from pd_serve.engine.tokenizer import EngineTokenizer
from pd_serve.intmath import div_ceil
from pd_serve.kv_budget import kv_budget, parse_memory
from pd_serve.model.config import load_model_config
from pd_serve.model.loader import check_device, load_model, resolve_dtype, weights_bytes
from pd_serve.model.source import resolve_model_path

log = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, config: EngineConfig, disagg: DisaggConfig | None = None) -> None:
        self.config = config
        torch.manual_seed(config.seed)
        self.model_dir = resolve_model_path(config.model, config.dtype, config.device, config.show_progress)
        self.model_config = load_model_config(self.model_dir)
        self.device = check_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.model_config, config.device)
        self.max_model_len = self._max_model_len()
        self.tokens = EngineTokenizer(self.model_dir, self.model_config)
        self.eos_ids = self.tokens.eos_ids
        self.model = load_model(self.model_dir, config.dtype, config.device, self.max_model_len, config.show_progress)
        self.kv_budget_how = "--max-total-tokens"
        budget = 0
        if config.max_total_tokens is None:
            try:
                budget, self.kv_budget_how = kv_budget(parse_memory(config.kv_cache_memory), config.device)
            except ValueError as exc:
                raise ConfigError(f"kv_cache_memory (--kv-cache-memory): {exc}") from exc
        num_pages = num_pages_for(
            self.model_config, self.dtype, config.page_size, config.max_total_tokens, budget, self.kv_budget_how
        )
        if config.max_total_tokens is None:  # more than every running request at full context never serves
            num_pages = min(num_pages, div_ceil(config.max_running_requests * self.max_model_len, config.page_size))
        self.kv = KVCache(self.model_config, num_pages, config.page_size, self.dtype, self.device)
        self.scheduler = Scheduler(
            SchedulerConfig(
                page_size=config.page_size,
                num_pages=num_pages,
                max_running_requests=config.max_running_requests,
                token_budget=config.chunked_prefill_size,
                max_model_len=self.max_model_len,
                enable_prefix_caching=config.enable_prefix_caching,
            )
        )
        self.runner = ModelRunner(self.model, self.kv, self.device, config.attention_backend)
        self.connector = make_connector(
            disagg, self.scheduler, self.kv.pools(), self.kv.layout, self.model_config.vocab_size
        )
        self._requests: dict[str, Request] = {}
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._pending: list[RequestDelta] = []
        self.steps = 0

    def memory(self) -> dict[str, int]:
        """What this engine holds on its device: the weights and the KV pools, in bytes."""
        return {
            "weights_bytes": weights_bytes(self.model),
            "kv_cache_bytes": self.kv.nbytes,
            "kv_capacity_tokens": self.kv.num_pages * self.kv.page_size,
        }

    @property
    def tokenizer(self):  # noqa: ANN201 (a transformers tokenizer)
        """The model's transformers tokenizer (the offline `LLM` encodes and renders chats with it)."""
        return self.tokens.transformers

    def close(self) -> None:
        self.connector.close()

    def _max_model_len(self) -> int:
        m = self.model_config
        limit = m.max_position_embeddings
        if m.sliding_window is not None and m.sliding_window < limit:
            log.warning("sliding_window=%d: context capped to the window (no sliding attention)", m.sliding_window)
            limit = m.sliding_window
        if self.config.max_model_len is not None:
            if self.config.max_model_len > limit:
                raise ValueError(
                    f"max_model_len (--max-model-len) {self.config.max_model_len} exceeds the model's limit {limit}"
                )
            limit = self.config.max_model_len
        return limit

    # ---- requests ------------------------------------------------------------------------
    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, pd: PDSpec | None = None
    ) -> None:
        """Queue a request; raises RequestRejected or InvalidParameter (nothing is queued then).

        With `pd`, a prefill node computes the prompt for the room's decode node and a decode node
        receives the prompt's KV from `pd.peer_endpoint` (the prefill node's transfer endpoint).
        """
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        vocab = self.model_config.vocab_size
        bad = next((t for t in prompt_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestRejected("prompt", f"token id {bad} is outside the vocabulary (0..{vocab - 1})")
        req = Request(request_id, list(prompt_token_ids), params)
        if pd is None:
            self.scheduler.add(req)
        else:
            self.connector.add(req, pd)
        self._requests[request_id] = req
        self._detok[request_id] = IncrementalDetokenizer(
            self.tokens.decode, req.prompt_token_ids, params.stop, params.skip_special_tokens
        )

    def abort(self, request_id: str, reason: str = "aborted") -> None:
        result = self.connector.abort(request_id, reason)
        if result is AbortResult.ENDED:
            self._end(self._requests[request_id], FinishReason.ABORT)
        elif result is AbortResult.IN_SCHEDULER:
            req = self.scheduler.abort(request_id)
            if req is not None:
                self._pending.append(self._finish_delta(req, [], None))

    def abort_all(self) -> None:
        for request_id in list(self._requests):
            self.abort(request_id, "engine shutting down")

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0 or bool(self._pending) or self.num_in_transfer > 0

    @property
    def num_in_transfer(self) -> int:
        return self.connector.num_in_flight

    def has_schedulable(self) -> bool:
        """Work the model can do now (not just rooms to wait on)."""
        return self.scheduler.num_unfinished > 0 or bool(self._pending)

    # ---- one step ------------------------------------------------------------------------
    def step(self) -> list[RequestDelta]:
        deltas, self._pending = self._pending, []
        for event in self.connector.poll():
            deltas.append(self._on_connector_event(event))
        if deltas:  # a first token that came with its KV goes out now, not after a decode step of everyone
            return deltas
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return deltas
        out = self.runner.run(sched)
        self.scheduler.commit(sched)
        self.steps += 1
        for chunk, token, lp in zip(out.sampled, out.result.token_ids, out.result.logprobs):
            req = chunk.request
            if self.connector.take_sampled(req, token, lp):
                continue
            reason, stop_reason = self._append(req, token)
            logprobs = None if lp is None else [TokenLogprob(token, lp.logprob, lp.top)]
            if reason is not None:
                self.scheduler.finish(req, reason)
            deltas.append(self._delta(req, [token], reason, stop_reason, logprobs))
        return deltas

    def _on_connector_event(self, event: Event) -> RequestDelta:
        req = event.request
        if isinstance(event, RoomFailed):
            delta = self._end(req, FinishReason.ABORT, error=event.reason, delta_only=True)
            delta.error_code = event.code
            return delta
        if isinstance(event, KVSent):
            req.finish_reason = FinishReason.LENGTH
            delta = self._finish_delta(req, [], None)
            delta.info = event.timings
            return delta
        # KVReceived: the first token came with the KV; commit it as if sampled here
        self.runner.sampler.skip_draw(req, self.model_config.vocab_size)
        reason, stop_reason = self._append(req, event.first_token)
        if reason is None:
            self.scheduler.add(req)
        else:
            self.scheduler.release(req)
        return self._delta(req, [event.first_token], reason, stop_reason, event.first_token_logprobs)

    def _append(self, req: Request, token: int) -> tuple[FinishReason | None, str | int | None]:
        """Add a token to the request; returns why it stops now, if it does."""
        req.output_token_ids.append(token)
        p = req.params
        stop_string = self._detok[req.request_id].add(token)
        if not p.ignore_eos and token in self.eos_ids or token in p.stop_token_ids:
            return FinishReason.STOP, token
        if stop_string is not None:
            return FinishReason.STOP, stop_string
        if len(req.output_token_ids) >= p.max_tokens or req.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH, None
        return None, None

    def _delta(
        self, req: Request, tokens: list[int], reason: FinishReason | None, stop_reason: str | int | None,
        logprobs: list[TokenLogprob] | None,
    ) -> RequestDelta:
        if reason is not None:
            req.status, req.finish_reason = RequestStatus.FINISHED, reason
            return self._finish_delta(req, tokens, stop_reason, logprobs)
        text = self._detok[req.request_id].release(finished=False)
        return RequestDelta(req.request_id, tokens, text, logprobs=logprobs, **self._counts(req))  # type: ignore[arg-type]

    def _end(self, req: Request, reason: FinishReason, error: str | None = None, delta_only: bool = False) -> RequestDelta:
        """Finish a request that is not in the scheduler (waiting on a room or just out of one)."""
        req.status, req.finish_reason = RequestStatus.FINISHED, reason
        delta = self._finish_delta(req, [], None)
        delta.error = error
        if not delta_only:
            self._pending.append(delta)
        return delta

    def _finish_delta(
        self, req: Request, tokens: list[int], stop_reason: str | int | None, logprobs: list[TokenLogprob] | None = None
    ) -> RequestDelta:
        detok = self._detok.pop(req.request_id)
        self._requests.pop(req.request_id, None)
        assert req.finish_reason is not None
        return RequestDelta(
            req.request_id,
            tokens,
            detok.release(finished=True),
            finished=True,
            finish_reason=req.finish_reason.value,
            stop_reason=stop_reason,
            logprobs=logprobs,
            **self._counts(req),  # type: ignore[arg-type]
        )

    @staticmethod
    def _counts(req: Request) -> dict[str, int]:
        return {
            "num_prompt_tokens": req.num_prompt_tokens,
            "num_output_tokens": len(req.output_token_ids),
            "num_cached_tokens": req.num_cached_tokens,
        }

    # ---- introspection -------------------------------------------------------------------
    def stats(self) -> EngineStats:
        s = self.scheduler
        cache = s.prefix_cache
        return EngineStats(
            num_running=len(s.running),
            num_waiting=len(s.waiting),
            num_total_pages=s.pages.num_pages,
            num_free_pages=s.pages.num_free,
            num_cached_pages=cache.num_cached if cache else 0,
            page_size=self.config.page_size,
            prefix_cache_queried_tokens=cache.queried_tokens if cache else 0,
            prefix_cache_hit_tokens=cache.hit_tokens if cache else 0,
            num_preemptions=s.num_preemptions,
            steps=self.steps,
            num_in_transfer=self.num_in_transfer,
            num_queued=self.connector.num_queued,
            num_requests=len(self._requests),
            **asdict(self.connector.stats()),
        )

    def flush_prefix_cache(self) -> int:
        return self.scheduler.pages.flush_cache()

    def prompt_logits(self, prompt_token_ids: list[int]) -> torch.Tensor:
        """Logits at every prompt position (float32 [len, vocab]), computed through the paged cache."""
        from pd_serve.engine.scheduler import ScheduledChunk

        req = Request("__logits__", list(prompt_token_ids), SamplingParams(max_tokens=1))
        pages = self.scheduler.allocate_pages(self.scheduler.pages_for(len(prompt_token_ids)))
        if pages is None:
            raise RuntimeError("not enough free KV pages to score the prompt")
        req.page_ids = pages
        try:
            return self.runner.forward_logits(ScheduleOutput([ScheduledChunk(req, 0, len(prompt_token_ids))]))
        finally:
            self.scheduler.release_pages(pages)

