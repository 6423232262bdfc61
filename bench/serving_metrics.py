"""Serving metrics from per-request timings: TTFT, ITL, TPOT, end-to-end latency, goodput.

Pure arithmetic on `RequestRecord`s (monotonic seconds); nothing here does I/O, so tests can feed it
synthetic timings. Definitions (the ones vLLM's and SGLang's bench_serving and DistServe use):
- TTFT: first streamed token chunk minus the moment the request was sent.
- ITL: the gaps between consecutive token chunks of one request (every gap is one sample).
- TPOT: (end-to-end - TTFT) / (output tokens - 1), per request; 0 for a one-token answer.
- handoff gap: second chunk minus first. In a 1P1D cluster the first token comes from the prefill
  node and the second is the decode node's first step, so this is the price of the handoff.
- goodput: completed requests meeting both the TTFT and the TPOT SLO, per second of benchmark time
  (DistServe). Failed requests never count.
Percentiles interpolate linearly between order statistics (numpy's default).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    """One request as the client saw it. `chunk_times` are the arrival times of token chunks."""

    start: float
    prompt_tokens: int = 0
    chunk_times: list[float] = field(default_factory=list)
    end: float | None = None
    output_tokens: int | None = None  # from the server's usage when it sent one, else the chunk count
    error: str | None = None  # a kind ("http_503", "timeout", ...); None when it completed
    error_detail: str | None = None  # the start of the error body, for people
    prefill_node: str | None = None
    decode_node: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.chunk_times) and self.end is not None

    @property
    def num_output_tokens(self) -> int:
        return self.output_tokens if self.output_tokens is not None else len(self.chunk_times)

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.start

    @property
    def e2e(self) -> float:
        assert self.end is not None
        return self.end - self.start

    @property
    def itls(self) -> list[float]:
        t = self.chunk_times
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def tpot(self) -> float:
        n = self.num_output_tokens
        return 0.0 if n <= 1 else (self.e2e - self.ttft) / (n - 1)

    @property
    def handoff_gap(self) -> float | None:
        t = self.chunk_times
        return t[1] - t[0] if len(t) >= 2 else None


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def distribution(values: Sequence[float], scale: float = 1000.0) -> dict[str, float]:
    """mean and p50/p90/p99 of `values`, multiplied by `scale` (seconds -> ms by default)."""
    out = {"mean": (sum(values) / len(values) * scale) if values else math.nan}
    for q in PERCENTILES:
        out[f"p{q}"] = percentile(values, q) * scale
    return out


def meets_slo(rec: RequestRecord, slo_ttft_ms: float | None, slo_tpot_ms: float | None) -> bool:
    """Completed, and within both SLOs (an SLO left at None always holds)."""
    if not rec.ok:
        return False
    if slo_ttft_ms is not None and rec.ttft * 1000.0 > slo_ttft_ms:
        return False
    return slo_tpot_ms is None or rec.tpot * 1000.0 <= slo_tpot_ms


def summarize(
    records: Iterable[RequestRecord],
    duration_s: float,
    slo_ttft_ms: float | None = None,
    slo_tpot_ms: float | None = None,
) -> dict[str, object]:
    """Every metric of one benchmark run; latencies in ms, throughputs per second of `duration_s`."""
    recs = list(records)
    done = [r for r in recs if r.ok]
    good = [r for r in done if meets_slo(r, slo_ttft_ms, slo_tpot_ms)]
    errors = Counter(r.error or "empty_stream" for r in recs if not r.ok)
    out_tokens = sum(r.num_output_tokens for r in done)
    per_s = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: math.nan)
    gaps = [g for r in done if (g := r.handoff_gap) is not None]
    return {
        "num_requests": len(recs),
        "completed": len(done),
        "failed": len(recs) - len(done),
        "errors": dict(sorted(errors.items())),
        "duration_s": duration_s,
        "prompt_tokens": sum(r.prompt_tokens for r in done),
        "output_tokens": out_tokens,
        "request_throughput": per_s(len(done)),
        "output_throughput": per_s(out_tokens),
        "goodput": per_s(len(good)),
        "slo_attainment": len(good) / len(recs) if recs else math.nan,
        "slo": {"ttft_ms": slo_ttft_ms, "tpot_ms": slo_tpot_ms},
        "ttft_ms": distribution([r.ttft for r in done]),
        "itl_ms": distribution([g for r in done for g in r.itls]),
        "tpot_ms": distribution([r.tpot for r in done if r.num_output_tokens > 1]),
        "e2e_ms": distribution([r.e2e for r in done]),
        "handoff_gap_ms": distribution(gaps),
    }
