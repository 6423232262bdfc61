"""The scheduler with a fake runner: admission, chunking, preemption and page accounting, no model."""

from __future__ import annotations

import pytest

from pd_serve.engine.request import FinishReason, Request, RequestStatus
from pd_serve.engine.sampling_params import SamplingParams
from pd_serve.engine.scheduler import RequestRejected, Scheduler, SchedulerConfig
from pd_serve.intmath import div_ceil


def make(num_pages: int = 64, page_size: int = 4, budget: int = 32, max_running: int = 8, prefix: bool = True) -> Scheduler:
    return Scheduler(SchedulerConfig(page_size, num_pages, max_running, budget, max_model_len=1024, enable_prefix_caching=prefix))


def req(rid: str, prompt_len: int, max_tokens: int = 4, base: int = 0) -> Request:
    return Request(rid, [(base + i) % 97 + 1 for i in range(prompt_len)], SamplingParams(max_tokens=max_tokens))


def step(s: Scheduler, token: int = 7):
    """One step with a fake runner: every sampling chunk yields `token`; max_tokens ends a request."""
    out = s.schedule()
    s.commit(out)
    finished = []
    for c in out.chunks:
        if c.samples:
            r = c.request
            r.output_token_ids.append(token)
            if len(r.output_token_ids) >= r.params.max_tokens:
                s.finish(r, FinishReason.LENGTH)
                finished.append(r)
    return out, finished


def drain(s: Scheduler, limit: int = 1000) -> int:
    steps = 0
    while s.num_unfinished:
        step(s)
        steps += 1
        assert steps < limit, "scheduler made no progress"
    return steps


def test_admission_respects_max_running_and_budget() -> None:
    s = make(budget=10, max_running=2)
    for i in range(3):
        s.add(req(f"r{i}", 4))
    out = s.schedule()
    assert [c.request.request_id for c in out.chunks] == ["r0", "r1"]
    assert out.num_tokens == 8
    assert [r.request_id for r in s.waiting] == ["r2"]


def test_long_prompt_is_chunked_under_the_token_budget() -> None:
    s = make(budget=8)
    r = req("long", 21)
    s.add(r)
    sizes = []
    while r.num_computed_tokens < r.num_prompt_tokens:
        out, _ = step(s)
        sizes.append(out.chunks[0].num_tokens)
    assert sizes == [8, 8, 5]
    assert r.output_token_ids == [7]  # sampled only when the prompt was complete
    assert len(r.page_ids) == div_ceil(22, 4)


def test_decodes_are_scheduled_before_new_prefills() -> None:
    s = make(budget=6)
    s.add(req("a", 4))
    step(s)
    s.add(req("b", 20))
    out, _ = step(s)
    assert [(c.request.request_id, c.num_tokens) for c in out.chunks] == [("a", 1), ("b", 5)]


def test_preemption_frees_the_newest_and_everything_finishes() -> None:
    s = make(num_pages=6, page_size=4, budget=64, max_running=8, prefix=False)
    reqs = [req(f"r{i}", 6, max_tokens=8, base=10 * i) for i in range(3)]  # each needs 4 pages at the end
    for r in reqs:
        s.add(r)
    drain(s)
    assert s.num_preemptions > 0
    assert all(r.status is RequestStatus.FINISHED and len(r.output_token_ids) == 8 for r in reqs)
    assert s.pages.num_free == 6


def test_preempted_request_is_requeued_at_the_front_for_recompute() -> None:
    s = make(num_pages=4, page_size=4, budget=64, prefix=False)
    a, b = req("a", 8, max_tokens=8), req("b", 8, max_tokens=8, base=40)
    s.add(a)
    s.add(b)
    step(s)  # both prefilled: 2 pages each
    out, _ = step(s)  # both need a third page: b, the newest, is preempted
    assert out.preempted == [b]
    assert b.num_computed_tokens == 0 and b.page_ids == [] and s.waiting[0] is b
    assert b.output_token_ids == [7]  # kept; recomputed with the prompt


def test_abort_and_completion_return_every_page() -> None:
    s = make(num_pages=32)
    start = s.pages.num_free
    for i in range(4):
        s.add(req(f"r{i}", 9, max_tokens=6, base=i * 13))
    step(s)
    step(s)
    assert s.pages.num_free < start
    assert s.abort("r1") is not None
    assert s.abort("r3") is not None
    assert s.abort("missing") is None
    drain(s)
    assert s.pages.num_free == start
    assert all(s.pages.ref_count(p) == 0 for p in range(32))


def test_abort_of_a_waiting_request() -> None:
    s = make(max_running=1)
    s.add(req("a", 4))
    s.add(req("b", 4))
    step(s)
    r = s.abort("b")
    assert r is not None and r.finish_reason is FinishReason.ABORT and not s.waiting


def test_requests_that_can_never_fit_are_rejected() -> None:
    s = make(num_pages=4, page_size=4)
    with pytest.raises(RequestRejected, match="--max-total-tokens"):
        s.add(req("big", 14, max_tokens=4))  # 18 tokens > 16
    with pytest.raises(RequestRejected, match="--max-model-len"):
        s.add(req("long", 1000, max_tokens=100))
    with pytest.raises(RequestRejected, match="empty"):
        s.add(req("empty", 0))
    assert not s.waiting


def test_prefix_cache_shares_pages_and_keeps_refcounts() -> None:
    s = make(num_pages=32, page_size=4)
    a = req("a", 13, max_tokens=2)
    s.add(a)
    step(s)
    a_pages = list(a.page_ids)  # before a finishes and gives them back
    drain(s)
    b, c = req("b", 13, max_tokens=2), req("c", 13, max_tokens=2)
    s.add(b)
    s.add(c)
    step(s)
    assert b.num_cached_tokens == c.num_cached_tokens == 12  # 3 full pages; the last token is always computed
    assert b.page_ids[:3] == c.page_ids[:3] == a_pages[:3]  # the very pages a computed, from the cache
    assert all(s.pages.ref_count(p) == 2 for p in a_pages[:3])  # one reference each for b and c
    drain(s)
    assert s.pages.num_free == 32
    assert s.pages.flush_cache() > 0
    assert s.pages.num_free == 32


def test_cached_pages_are_evicted_lru_when_the_pool_is_full() -> None:
    s = make(num_pages=8, page_size=4)
    s.add(req("a", 16, max_tokens=1))
    drain(s)
    assert s.prefix_cache is not None and s.prefix_cache.num_cached == 4
    s.add(req("b", 24, max_tokens=4, base=50))  # needs 7 pages: evicts cached ones
    drain(s)
    assert s.pages.num_free == 8
