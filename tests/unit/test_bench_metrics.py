"""bench/serving_metrics.py on synthetic timings: TTFT, ITL, TPOT, handoff gap, percentiles, goodput."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from serving_metrics import RequestRecord, meets_slo, percentile, summarize  # noqa: E402


def rec(start: float, chunks: list[float], end: float | None = None, **kw: object) -> RequestRecord:
    return RequestRecord(start=start, chunk_times=chunks, end=chunks[-1] if end is None else end, **kw)  # type: ignore[arg-type]


def test_ttft_itl_tpot_e2e_and_handoff_gap() -> None:
    r = rec(10.0, [10.5, 10.6, 10.8, 11.1], end=11.1)
    assert r.ttft == pytest.approx(0.5)
    assert r.itls == pytest.approx([0.1, 0.2, 0.3])
    assert r.e2e == pytest.approx(1.1)
    assert r.tpot == pytest.approx(0.6 / 3)  # (e2e - ttft) / (tokens - 1)
    assert r.handoff_gap == pytest.approx(0.1)


def test_tpot_uses_the_servers_token_count_when_chunks_carry_several_tokens() -> None:
    r = rec(0.0, [1.0, 2.0], output_tokens=5)
    assert r.tpot == pytest.approx(1.0 / 4)
    assert r.itls == pytest.approx([1.0])  # ITL stays per chunk


def test_one_token_answer_has_zero_tpot_and_no_gap() -> None:
    r = rec(0.0, [0.3])
    assert r.tpot == 0.0
    assert r.handoff_gap is None and r.itls == []


def test_percentile_interpolates_like_numpy() -> None:
    values = [1.0, 2.0, 3.0, 4.0]
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(values, 99) == pytest.approx(3.97)
    assert percentile([7.0], 90) == 7.0
    assert math.isnan(percentile([], 50))


def test_goodput_counts_requests_meeting_both_slos_per_second() -> None:
    records = [
        rec(0.0, [0.1, 0.15, 0.2]),  # TTFT 100 ms, TPOT 50 ms: good
        rec(0.0, [0.5, 0.55, 0.6]),  # TTFT 500 ms: misses TTFT
        rec(0.0, [0.1, 0.4, 0.7]),  # TPOT 300 ms: misses TPOT
        RequestRecord(start=0.0, error="http_503"),  # failed: never counts
    ]
    s = summarize(records, duration_s=2.0, slo_ttft_ms=200.0, slo_tpot_ms=100.0)
    assert s["goodput"] == pytest.approx(0.5)
    assert s["slo_attainment"] == pytest.approx(0.25)
    assert s["completed"] == 3 and s["failed"] == 1 and s["errors"] == {"http_503": 1}
    assert s["request_throughput"] == pytest.approx(1.5)
    assert s["output_throughput"] == pytest.approx(9 / 2.0)


def test_no_slo_means_every_completed_request_is_good() -> None:
    assert meets_slo(rec(0.0, [5.0, 9.0]), None, None)
    assert not meets_slo(RequestRecord(start=0.0), None, None)  # nothing streamed


def test_summary_distributions_in_ms() -> None:
    records = [rec(0.0, [0.1, 0.2]), rec(1.0, [1.3, 1.6, 1.7])]
    s = summarize(records, duration_s=1.7)
    assert s["ttft_ms"]["mean"] == pytest.approx(200.0)
    assert s["itl_ms"]["p50"] == pytest.approx(100.0)  # samples 100, 300, 100 ms
    assert s["itl_ms"]["mean"] == pytest.approx(500.0 / 3)
    assert s["handoff_gap_ms"]["p50"] == pytest.approx(200.0)  # 100 and 300 ms
    assert s["e2e_ms"]["p50"] == pytest.approx(450.0)
    assert s["tpot_ms"]["mean"] == pytest.approx((100.0 + 200.0) / 2)


def test_poisson_gaps_are_seeded_with_mean_one_over_rate() -> None:
    from bench_serving import arrival_gaps

    gaps = arrival_gaps(4000, rate=4.0, seed=1)
    assert gaps == arrival_gaps(4000, rate=4.0, seed=1)
    assert sum(gaps) / len(gaps) == pytest.approx(0.25, rel=0.05)
    assert arrival_gaps(3, rate=math.inf, seed=0) == [0.0, 0.0, 0.0]


def test_long_prompt_mix_has_a_fifth_of_long_prompts() -> None:
    from workloads import long_prompt_mix

    items = long_prompt_mix(100, vocab=256, seed=3)
    assert items == long_prompt_mix(100, vocab=256, seed=3)
    assert sum(it.prompt_len > 160 for it in items) == 20  # base prompts are at most 160 tokens
    assert all(10 <= t < 256 for it in items for t in it.prompt_token_ids)


def test_stream_parsing_counts_token_chunks_and_reads_usage() -> None:
    import asyncio

    import httpx
    from bench_serving import BenchConfig, send_request
    from workloads import Item

    def chunk(text: str) -> str:
        return "data: " + json.dumps({"choices": [{"index": 0, "text": text}]}) + "\n\n"

    body = chunk("a") + chunk("") + chunk("b") + 'data: {"choices": [], "usage": {"prompt_tokens": 3, '
    body += '"completion_tokens": 3}}\n\ndata: [DONE]\n\n'
    handler = lambda req: httpx.Response(200, text=body, headers={"x-pd-prefill": "p0", "x-pd-decode": "d0"})  # noqa: E731
    broken = lambda req: httpx.Response(200, text=chunk("a"))  # noqa: E731

    async def go(h: object) -> RequestRecord:
        async with httpx.AsyncClient(transport=httpx.MockTransport(h)) as client:  # type: ignore[arg-type]
            return await send_request(client, BenchConfig("http://x"), Item([11, 12, 13], 3))

    r = asyncio.run(go(handler))
    assert r.ok and len(r.chunk_times) == 3 and r.output_tokens == 3 and r.prefill_node == "p0"
    assert asyncio.run(go(broken)).error == "incomplete_stream"
    assert asyncio.run(go(lambda req: httpx.Response(503, text="busy"))).error == "http_503"


def test_records_survive_the_json_round_trip() -> None:
    from bench_serving import _request_json
    from compare_report import record_from_json

    r = rec(1.0, [1.2, 1.3, 1.6], output_tokens=3)
    back = record_from_json(_request_json(r, t0=1.0))
    assert back.ttft == pytest.approx(r.ttft) and back.tpot == pytest.approx(r.tpot)
    assert back.itls == pytest.approx(r.itls, abs=1e-6)
