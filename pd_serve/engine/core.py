"""EngineCore: one engine's state and its `step()`; used in-process by `LLM` and by the engine loop.

`add_request` validates and queues; `step` schedules, runs the model, applies the sampled tokens
(stop checks and detokenization) and returns one `RequestDelta` per request that produced
something. Aborted and rejected requests also come back as deltas, so every request that entered
ends with exactly one finished delta.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from pd_serve.config import DisaggConfig, EngineConfig
from pd_serve.engine.detokenizer import IncrementalDetokenizer
from pd_serve.engine.disagg import DecodeSide, Event, Failed, PrefillSide, Sent
from pd_serve.engine.kv_cache import KVCache, num_pages_for
from pd_serve.engine.messages import EngineStats, PDSpec, RequestDelta, TokenLogprob
from pd_serve.engine.request import FinishReason, Request, RequestStatus
from pd_serve.engine.runner import ModelRunner
from pd_serve.engine.sampler import TokenLogprobs
from pd_serve.engine.sampling_params import SamplingParams
from pd_serve.engine.scheduler import RequestRejected, ScheduleOutput, Scheduler, SchedulerConfig
from pd_serve.model.config import ModelConfig, load_model_config
from pd_serve.model.loader import check_device, load_model, resolve_dtype, weights_bytes
from pd_serve.model.source import resolve_model_path

log = logging.getLogger(__name__)


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
    """The engine only decodes and needs the eos token. Where transformers would use tokenizer.json as
    it stands, `tokenizers` reads it directly, so the engine process does not import transformers (3 to
    4 s of every node's start). None otherwise (another tokenizer class, no tokenizer.json)."""
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


class EngineCore:
    def __init__(self, config: EngineConfig, disagg: DisaggConfig | None = None) -> None:
        self.config = config
        self.disagg = disagg
        torch.manual_seed(config.seed)
        self.model_dir = resolve_model_path(config.model, config.dtype, config.device, config.show_progress)
        self.model_config = load_model_config(self.model_dir)
        self.device = check_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.model_config, config.device)
        self.max_model_len = self._max_model_len()
        self._tokenizer: Any = None  # transformers', loaded on first use of `tokenizer`
        verbatim = verbatim_tokenizer(self.model_dir)
        if verbatim is not None:
            self._decode = verbatim.decode
            tokenizer_eos = verbatim_eos_id(self.model_dir, verbatim)
        else:
            backend = getattr(self.tokenizer, "backend_tokenizer", None)
            self._decode = backend.decode if backend is not None else self.tokenizer.decode
            tokenizer_eos = getattr(self.tokenizer, "eos_token_id", None)
        self.eos_ids = eos_token_ids(self.model_dir, self.model_config, tokenizer_eos)
        self.model = load_model(self.model_dir, config.dtype, config.device, self.max_model_len, config.show_progress)
        num_pages = num_pages_for(
            self.model_config, self.dtype, config.page_size, config.max_total_tokens, config.kv_cache_memory
        )
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
        self.transfer: Any = None
        self.prefill_side: PrefillSide | None = None
        self.decode_side: DecodeSide | None = None
        if disagg is not None:
            self._start_transfer(disagg)
        self._requests: dict[str, Request] = {}
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._pending: list[RequestDelta] = []
        self.steps = 0

    def memory(self) -> dict[str, int]:
        """What this engine holds on its device: the weights and the KV pools, in bytes."""
        return {"weights_bytes": weights_bytes(self.model), "kv_cache_bytes": self.kv.nbytes}

    @property
    def tokenizer(self):  # noqa: ANN201 (a transformers tokenizer)
        """The model's transformers tokenizer (the offline `LLM` encodes and renders chats with it)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.model_dir)
        return self._tokenizer

    def _start_transfer(self, disagg: DisaggConfig) -> None:
        from pd_serve.transfer import LayoutFingerprint, TransferEngine

        fingerprint = LayoutFingerprint.from_value(self.kv.layout.to_dict())
        self.transfer = TransferEngine(disagg.transfer, self.kv.pools(), fingerprint).start()
        if disagg.role == "prefill":
            self.prefill_side = PrefillSide(self.transfer, self.scheduler)
        else:
            self.decode_side = DecodeSide(self.transfer, self.scheduler, disagg.reserve_tokens, disagg.page_wait_timeout)

    def close(self) -> None:
        if self.transfer is not None:
            self.transfer.close()
            self.transfer = None

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
        elif self.prefill_side is not None:
            req.params = replace(params, max_tokens=1, stop=(), ignore_eos=True)
            self.prefill_side.add(req, pd.room)
        elif self.decode_side is not None:
            if not pd.peer_endpoint:
                raise RequestRejected("pd", "a decode node needs the prefill node's transfer endpoint")
            self.decode_side.add(req, pd.room, pd.peer_endpoint)
        else:
            raise RequestRejected("pd", "this node serves colocated requests only (no prefill/decode role)")
        self._requests[request_id] = req
        self._detok[request_id] = IncrementalDetokenizer(
            self._decode, req.prompt_token_ids, params.stop, params.skip_special_tokens
        )

    def abort(self, request_id: str, reason: str = "aborted") -> None:
        if self.prefill_side is not None and self.prefill_side.abort(request_id, reason):
            return  # its room ends in a later poll
        if self.decode_side is not None and self.decode_side.owns(request_id):
            req = self.decode_side.abort(request_id, reason)
            if req is not None:
                self._end(req, FinishReason.ABORT)
            return
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
        return len(self.prefill_side or ()) + len(self.decode_side or ())

    def has_schedulable(self) -> bool:
        """Work the model can do now (not just rooms to wait on)."""
        return self.scheduler.num_unfinished > 0 or bool(self._pending)

    # ---- one step ------------------------------------------------------------------------
    def step(self) -> list[RequestDelta]:
        deltas, self._pending = self._pending, []
        for event in self._poll_transfers():
            deltas.append(self._on_transfer_event(event))
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return deltas
        out = self.runner.run(sched)
        self.scheduler.commit(sched)
        self.steps += 1
        for chunk, token, lp in zip(out.sampled, out.result.token_ids, out.result.logprobs):
            req = chunk.request
            if self.prefill_side is not None and self.prefill_side.owns(req.request_id):
                self.prefill_side.first_token(req, token, _logprobs_wire(lp))
                req.output_token_ids.append(token)
                continue
            reason, stop_reason = self._append(req, token)
            logprobs = None if lp is None else [TokenLogprob(token, lp.logprob, lp.top)]
            if reason is not None:
                self.scheduler.finish(req, reason)
            deltas.append(self._delta(req, [token], reason, stop_reason, logprobs))
        return deltas

    def _poll_transfers(self) -> list[Event]:
        events: list[Event] = []
        if self.prefill_side is not None:
            events += self.prefill_side.poll()
        if self.decode_side is not None:
            events += self.decode_side.poll()
        return events

    def _on_transfer_event(self, event: Event) -> RequestDelta:
        req = event.request
        if isinstance(event, Failed):
            return self._end(req, FinishReason.ABORT, error=event.reason, delta_only=True)
        if isinstance(event, Sent):
            req.finish_reason = FinishReason.LENGTH
            delta = self._finish_delta(req, [], None)
            delta.info = event.timings
            return delta
        # Ready: the first token came with the KV; commit it as if sampled here
        token = int(event.first_token)
        if not 0 <= token < self.model_config.vocab_size:  # the peer proved the token, not its sanity
            self.scheduler.pages.release(req.page_ids)
            req.page_ids = []
            why = f"prefill peer sent first token {token}, outside the vocabulary of {self.model_config.vocab_size}"
            return self._end(req, FinishReason.ABORT, error=why, delta_only=True)
        if req.generator is not None and not req.params.greedy:
            torch.empty(self.model_config.vocab_size).exponential_(generator=req.generator)  # the draw P made
        reason, stop_reason = self._append(req, token)
        logprobs = _logprobs_from_wire(token, event.first_token_logprobs) if req.params.logprobs is not None else None
        if reason is None:
            self.scheduler.add(req)
        else:
            self.scheduler.pages.release(req.page_ids)
            req.page_ids = []
        return self._delta(req, [token], reason, stop_reason, logprobs)

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
            num_requests=len(self._requests),
            **self._transfer_stats(),
        )

    def _transfer_stats(self) -> dict[str, Any]:
        # not `or`: an idle side is falsy (it has a __len__), and its counters must still show
        side = self.prefill_side if self.prefill_side is not None else self.decode_side
        if side is None:
            return {}
        return {
            "rooms_succeeded": side.rooms_succeeded,
            "rooms_failed": side.rooms_failed,
            "kv_pages_sent": getattr(side, "pages_sent", 0),
            "kv_pages_received": getattr(side, "pages_received", 0),
            "kv_pages_reused": getattr(side, "pages_reused", 0),
            "transfer": self.transfer.stats() if self.transfer is not None else {},
            "transfer_planes": self.transfer.plane_stats() if self.transfer is not None else {},
            "transfer_peers": self.transfer.peers() if self.transfer is not None else {},
        }

    def flush_prefix_cache(self) -> int:
        return self.scheduler.pages.flush_cache()

    def prompt_logits(self, prompt_token_ids: list[int]) -> torch.Tensor:
        """Logits at every prompt position (float32 [len, vocab]), computed through the paged cache."""
        from pd_serve.engine.scheduler import ScheduledChunk

        req = Request("__logits__", list(prompt_token_ids), SamplingParams(max_tokens=1))
        pages = self.scheduler.pages.allocate(-(-len(prompt_token_ids) // self.config.page_size))
        if pages is None:
            raise RuntimeError("not enough free KV pages to score the prompt")
        req.page_ids = pages
        try:
            return self.runner.forward_logits(ScheduleOutput([ScheduledChunk(req, 0, len(prompt_token_ids))]))
        finally:
            self.scheduler.pages.release(pages)


def _logprobs_wire(lp: TokenLogprobs | None) -> list[Any] | None:
    """The first token's logprobs as they travel in the transfer's completion message."""
    return None if lp is None else [lp.logprob, [list(t) for t in lp.top]]


def _logprobs_from_wire(token: int, wire: Any) -> list[TokenLogprob] | None:
    if not wire:
        return None
    logprob, top = wire
    return [TokenLogprob(token, float(logprob), [(int(t), float(v)) for t, v in top])]
