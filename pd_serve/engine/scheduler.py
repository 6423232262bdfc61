"""Continuous-batching scheduler: who runs this step, with how many tokens, in which pages.

Call order per step: `schedule()` -> the runner computes the chunks -> `commit(output)` -> the
engine appends sampled tokens and calls `finish()` for requests that stopped. `add()` and `abort()`
come between steps. The scheduler never touches tensors, so tests drive it with a fake runner.

Policy: running requests first (oldest first), each given its remaining tokens under the step's
token budget (`--chunked-prefill-size`), so long prompts are prefilled in chunks; then waiting
requests are admitted while budget, pages and `--max-running-requests` allow. When pages run out,
the newest running request is preempted: its pages are released and it is requeued at the front to
be recomputed. A request that could never fit is rejected in `add()`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from pd_serve.engine.page_allocator import PageAllocator
from pd_serve.engine.prefix_cache import PrefixCache, page_hashes
from pd_serve.engine.request import FinishReason, Request, RequestStatus
from pd_serve.intmath import div_ceil


class RequestRejected(ValueError):
    """The request can never be served with this configuration; `param` names the field at fault."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SchedulerConfig:
    page_size: int
    num_pages: int
    max_running_requests: int
    token_budget: int
    max_model_len: int
    enable_prefix_caching: bool = True


@dataclass
class ScheduledChunk:
    request: Request
    start: int  # tokens already computed before this step
    num_tokens: int  # tokens computed this step

    @property
    def samples(self) -> bool:
        """The chunk reaches the end of the request's tokens, so its last position is sampled."""
        return self.start + self.num_tokens == self.request.num_tokens


@dataclass
class ScheduleOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.prefix_cache = PrefixCache() if config.enable_prefix_caching else None
        self.pages = PageAllocator(config.num_pages, self.prefix_cache)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    # ---- admission and removal -------------------------------------------------------------
    def add(self, request: Request) -> None:
        self.check_fits(len(request.prompt_token_ids), request.params.max_tokens)
        self.waiting.append(request)

    def check_fits(self, prompt_len: int, max_tokens: int) -> None:
        c = self.config
        if prompt_len == 0:
            raise RequestRejected("prompt", "the prompt is empty")
        total = prompt_len + max_tokens
        if total > c.max_model_len:
            raise RequestRejected(
                "max_tokens",
                f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = {total} exceeds the "
                f"context length {c.max_model_len} (--max-model-len)",
            )
        pages = div_ceil(total, c.page_size)
        if pages > c.num_pages:
            raise RequestRejected(
                "max_tokens",
                f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) needs {pages} KV pages but "
                f"the pool has {c.num_pages} ({c.num_pages * c.page_size} tokens; --max-total-tokens "
                f"or --kv-cache-memory)",
            )

    def abort(self, request_id: str) -> Request | None:
        for req in self.waiting:
            if req.request_id == request_id:
                self.waiting.remove(req)
                self.release(req)
                req.status, req.finish_reason = RequestStatus.FINISHED, FinishReason.ABORT
                return req
        for req in self.running:
            if req.request_id == request_id:
                self.finish(req, FinishReason.ABORT)
                return req
        return None

    def finish(self, request: Request, reason: FinishReason) -> None:
        self.running.remove(request)
        self.release(request)
        request.status, request.finish_reason = RequestStatus.FINISHED, reason

    def hand_over(self, request: Request) -> list[int]:
        """Remove a running request but keep its pages referenced: the caller now owns them."""
        self.running.remove(request)
        pages, request.page_ids = request.page_ids, []
        request.status = RequestStatus.FINISHED
        return pages

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # ---- pages, for requests outside the queues (the KV connector's) ------------------------
    @property
    def page_size(self) -> int:
        return self.config.page_size

    def pages_for(self, num_tokens: int) -> int:
        """Pages that hold `num_tokens` tokens."""
        return div_ceil(num_tokens, self.config.page_size)

    def allocate_pages(self, n: int, reserve: int = 0) -> list[int] | None:
        """n pages, or None (nothing taken) unless `reserve` more would still be free."""
        return self.pages.allocate(n, reserve)

    def release_pages(self, pages: list[int]) -> None:
        self.pages.release(pages)

    def adopt_prompt(self, request: Request, pages: list[int], num_cached_pages: int) -> None:
        """The request's prompt KV is in `pages` (the first `num_cached_pages` shared from the prefix
        cache, the rest written by a peer): it is computed, and `add()` makes it decode."""
        request.page_ids = pages
        request.num_computed_tokens = request.num_prompt_tokens
        request.num_hashed_pages = num_cached_pages

    # ---- one step --------------------------------------------------------------------------
    def schedule(self) -> ScheduleOutput:
        out = ScheduleOutput()
        budget = self.config.token_budget
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self._reserve(req, n, out):
                continue  # req itself was preempted; the list shifted
            out.chunks.append(ScheduledChunk(req, req.num_computed_tokens, n))
            budget -= n
            i += 1
        if not out.preempted:
            self._admit(budget, out)
        return out

    def commit(self, out: ScheduleOutput) -> None:
        """Record the chunks as computed and offer newly full pages to the prefix cache."""
        for chunk in out.chunks:
            req = chunk.request
            req.num_computed_tokens = chunk.start + chunk.num_tokens
            self._cache_full_pages(req)

    # ---- internals -------------------------------------------------------------------------
    def _admit(self, budget: int, out: ScheduleOutput) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_running_requests:
            req = self.waiting[0]
            if not req.page_ids:
                self._match_prefix(req)
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            need = self._pages_needed(req, n)
            new_pages = self.pages.allocate(need)
            if new_pages is None:
                break
            req.page_ids += new_pages
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.chunks.append(ScheduledChunk(req, req.num_computed_tokens, n))
            budget -= n

    def _reserve(self, req: Request, n: int, out: ScheduleOutput) -> bool:
        """Give req pages for n more tokens, preempting the newest requests if needed."""
        need = self._pages_needed(req, n)
        while True:
            pages = self.pages.allocate(need)
            if pages is not None:
                req.page_ids += pages
                return True
            victim = self.running[-1]
            self._preempt(victim, out)
            if victim is req:
                return False

    def _preempt(self, req: Request, out: ScheduleOutput) -> None:
        self.running.remove(req)
        self.release(req)
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)
        out.preempted.append(req)

    def release(self, req: Request) -> None:
        """Drop the request's pages (and with them what it had computed)."""
        self.pages.release(req.page_ids)
        req.page_ids = []
        req.num_computed_tokens = 0
        req.num_hashed_pages = 0

    def _pages_needed(self, req: Request, n: int) -> int:
        total = req.num_computed_tokens + n
        return max(0, self.pages_for(total) - len(req.page_ids))

    def _keys(self, req: Request, num_pages: int) -> list[int]:
        """Prefix-cache keys of the request's first num_pages full pages (memoised on the request)."""
        have = len(req.page_hashes)
        if num_pages > have:
            parent = req.page_hashes[-1] if have else None
            tokens = req.all_token_ids[: num_pages * self.config.page_size]
            req.page_hashes += page_hashes(tokens, self.config.page_size, start=have, parent=parent)
        return req.page_hashes[:num_pages]

    def take_cached_prefix(self, req: Request, record: bool = True) -> list[int]:
        """Pages of the request's longest cached prefix (full pages, leaving at least one token to
        compute, so that the last position yields logits), with a reference taken on each for the
        caller; [] without a prefix cache. With `record`, the lookup counts in the cache's
        statistics and sets the request's `num_cached_tokens`."""
        if self.prefix_cache is None:
            return []
        usable = (req.num_tokens - 1) // self.config.page_size
        pages = self.prefix_cache.match(self._keys(req, usable))
        if record:
            self.prefix_cache.record_lookup(req.num_tokens, len(pages) * self.config.page_size)
            req.num_cached_tokens = len(pages) * self.config.page_size
        self.pages.share(pages)
        return pages

    def _match_prefix(self, req: Request) -> None:
        if self.prefix_cache is None:
            return
        pages = self.take_cached_prefix(req, record=req.num_preemptions == 0)
        req.page_ids = list(pages)
        req.num_computed_tokens = len(pages) * self.config.page_size
        req.num_hashed_pages = len(pages)

    def _cache_full_pages(self, req: Request) -> None:
        if self.prefix_cache is None:
            return
        full = req.num_computed_tokens // self.config.page_size
        if full <= req.num_hashed_pages:
            return
        keys = self._keys(req, full)
        for i in range(req.num_hashed_pages, full):
            self.prefix_cache.insert(keys[i], req.page_ids[i])
        req.num_hashed_pages = full
