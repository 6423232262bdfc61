"""bench/soak.py's analysis: the RSS slope fit, the per-process memory table, outcome classes, the report;
and bench/leakcheck.py's parsing of in-flight gauges."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from leakcheck import Leak, in_flight_gauges, report  # noqa: E402
from soak import classify, label, markdown, memory_table, process_tree, slope_per_minute, verdict  # noqa: E402


def test_slope_of_a_line_in_mib_per_minute() -> None:
    points = [(t, 100.0 + 0.5 * t) for t in range(0, 120, 3)]  # 0.5 MiB/s
    assert slope_per_minute(points) == pytest.approx(30.0)


def test_slope_of_flat_noisy_memory_is_near_zero() -> None:
    points = [(float(t), 200.0 + (1.0 if t % 2 else -1.0)) for t in range(100)]
    assert abs(slope_per_minute(points)) < 0.5


def test_slope_needs_two_distinct_times() -> None:
    assert slope_per_minute([]) == 0.0
    assert slope_per_minute([(1.0, 5.0)]) == 0.0
    assert slope_per_minute([(1.0, 5.0), (1.0, 9.0)]) == 0.0


def test_memory_table_leaves_out_the_warmup() -> None:
    series = {"decode-0/engine": [(0.0, 50.0), (10.0, 300.0), (70.0, 300.0), (130.0, 302.0)]}
    (row,) = memory_table(series, warmup_s=10.0)
    assert row["process"] == "decode-0/engine"
    assert (row["samples"], row["start_mib"], row["end_mib"]) == (3, 300.0, 302.0)
    assert row["slope_mib_per_min"] == pytest.approx(1.0, abs=0.01)
    assert memory_table({"x/main": [(1.0, 5.0)]}, warmup_s=10.0) == []


def test_classify_keeps_cancellations_apart_from_errors() -> None:
    outcomes = Counter({"ok": 90, "cancelled": 20, "error:prefill_failed": 2, "hang": 1, "broken:ReadError": 1})
    c = classify(outcomes)
    assert c["requests"] == 114 and c["ok"] == 90 and c["cancelled_by_client"] == 20
    assert c["errors"] == {"error:prefill_failed": 2}
    assert c["unclean"] == {"broken:ReadError": 1, "hang": 1}


def _result(**changes: object) -> dict[str, object]:
    result: dict[str, object] = {
        "date": "2026-11-21T17:50Z",
        "command": "python bench/soak.py --minutes 1",
        "config": {"minutes": 1, "prefill": 1, "decode": 1, "concurrency": 8, "seed": 0, "disconnect": 0.2,
                   "warmup_s": 12.0},
        "summary": classify(Counter({"ok": 10, "cancelled": 2})),
        "leaks": [],
        "exits": [],
        "memory": [{"process": "prefill-0/engine", "samples": 5, "start_mib": 400.0, "end_mib": 401.0,
                    "slope_mib_per_min": 0.2}],
    }  # fmt: skip
    result.update(changes)
    return result


def test_markdown_report_names_everything() -> None:
    text = markdown(_result())
    assert "requests: 12 (ok 10, cancelled by the client 2)" in text
    assert "| prefill-0/engine | 5 | 400.0 | 401.0 | 0.2 |" in text
    assert "leaks after idle: none" in text


def test_verdict_fails_on_leak_unclean_or_exit() -> None:
    assert verdict(_result())
    assert not verdict(_result(leaks=[{"process": "decode-0", "counter": "pages_free"}]))
    assert not verdict(_result(exits=["pd-serve up: decode-0 exited with -9"]))
    assert not verdict(_result(summary=classify(Counter({"ok": 1, "hang": 1}))))


def test_process_tree_and_labels() -> None:
    children = {10: [11], 11: [12, 13]}
    assert process_tree(10, children) == [(10, 0), (11, 1), (12, 2), (13, 2)]
    assert label("decode-0", 2, 0) == "decode-0/engine"
    assert label("decode-0", 2, 1) == "decode-0/engine-1"
    tracker = "python -c from multiprocessing.resource_tracker import main;main(7)"
    assert label("decode-0", 2, 0, tracker) == "decode-0/tracker"


def test_in_flight_gauges_and_leak_report() -> None:
    text = "\n".join(
        [
            "# HELP pd_frontend_node_active_requests Requests in flight per node",
            'pd_frontend_node_active_requests{node="decode-0",role="decode"} 2.0',
            'pd_frontend_key_in_flight{key="key-0"} 0.0',
            'pd_frontend_requests_total{status="200"} 7.0',
        ]
    )
    gauges = in_flight_gauges(text)
    assert gauges == {
        'pd_frontend_node_active_requests{node="decode-0",role="decode"}': 2.0,
        'pd_frontend_key_in_flight{key="key-0"}': 0.0,
    }
    assert report([]) == "no leak"
    assert "decode-0: pages_free is 90, idle value 128" in report([Leak("decode-0", "pages_free", 90, 128)])
