"""compare_pd.py's results page: the Markdown tables, the target checks and the PNG plots.

Reads only the report dict compare_pd.py builds (and the nodes' saved /metrics); runs nothing.
matplotlib is imported lazily: it is not a pd-serve dependency (`pip install matplotlib`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from serving_metrics import RequestRecord, summarize

LABEL = {"colocated": "colocated (1 node, 2 cores)", "disaggregated": "1P1D (1 core each)"}
LOW_LOAD_TTFT_RATIO = 1.25
ITL_RATIO = 1 / 3
SUSTAINED_ATTAINMENT = 0.9


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("compare_pd.py draws its plots with matplotlib: pip install matplotlib") from None


def record_from_json(r: dict[str, Any]) -> RequestRecord:
    """Rebuild a RequestRecord from bench_serving's per-request JSON (times relative to its t0)."""
    start = r["sent_ms"] / 1000.0
    rec = RequestRecord(start=start, prompt_tokens=r["prompt_tokens"], error=r["error"])
    if r["error"] is None and "ttft_ms" in r:
        t = start + r["ttft_ms"] / 1000.0
        rec.chunk_times = [t]
        for gap in r["itl_ms"]:
            t += gap / 1000.0
            rec.chunk_times.append(t)
        rec.end, rec.output_tokens = start + r["e2e_ms"] / 1000.0, r["output_tokens"]
    return rec


def resummarize(result: dict[str, Any], slo_ttft_ms: float | None, slo_tpot_ms: float | None) -> dict[str, Any]:
    """The same run with other SLOs (goodput and attainment change, nothing else)."""
    records = [record_from_json(r) for r in result["requests"]]
    summary = summarize(records, result["summary"]["duration_s"], slo_ttft_ms, slo_tpot_ms)
    config = {**result["config"], "slo_ttft_ms": slo_ttft_ms, "slo_tpot_ms": slo_tpot_ms}
    return {**result, "config": config, "summary": summary}


def _rates(report: dict[str, Any], kind: str) -> list[str]:
    return list(report["systems"]["colocated"][kind]["rates"])


def _s(report: dict[str, Any], system: str, kind: str, rate: str) -> dict[str, Any]:
    return report["systems"][system][kind]["rates"][rate]["summary"]


def targets(report: dict[str, Any], kind: str = "long-mix") -> dict[str, Any]:
    """ITL p99 at the highest rate colocated sustains (SLO attainment >= 90%), and low-load TTFT."""
    systems = report["systems"]
    if kind not in systems["colocated"]:
        return {}
    rates = _rates(report, kind)
    sustained = []  # rates up to the first one colocated does not sustain (>= 90% of requests within the SLOs)
    for r in rates:
        if _s(report, "colocated", kind, r)["slo_attainment"] < SUSTAINED_ATTAINMENT:
            break
        sustained.append(r)
    rate = sustained[-1] if sustained else rates[0]
    itl_c, itl_d = (_s(report, s, kind, rate)["itl_ms"]["p99"] for s in ("colocated", "disaggregated"))
    low_c, low_d = (systems[s][kind]["low_load"]["summary"]["ttft_ms"] for s in ("colocated", "disaggregated"))
    return {
        "workload": kind,
        "rate": rate,
        "colocated_sustains_it": bool(sustained),
        "itl_p99_ms": {"colocated": itl_c, "disaggregated": itl_d, "ratio": itl_d / itl_c},
        "itl_target_holds": itl_d <= ITL_RATIO * itl_c,
        "low_load_ttft_p50_ms": {"colocated": low_c["p50"], "disaggregated": low_d["p50"],
                                 "ratio": low_d["p50"] / low_c["p50"]},
        "low_load_ttft_mean_ms": {"colocated": low_c["mean"], "disaggregated": low_d["mean"],
                                  "ratio": low_d["mean"] / low_c["mean"]},
        "ttft_target_holds": low_d["p50"] <= LOW_LOAD_TTFT_RATIO * low_c["p50"],
    }


def _row(system: str, rate: str, s: dict[str, Any]) -> str:
    errors = ", ".join(f"{k} {v}" for k, v in s["errors"].items()) or "-"
    cells = [LABEL[system], rate, f"{s['completed']}/{s['num_requests']}", errors,
             f"{s['request_throughput']:.2f}", f"{s['output_throughput']:.1f}", f"{s['goodput']:.2f}",
             f"{s['slo_attainment']:.0%}", f"{s['ttft_ms']['p50']:.0f}", f"{s['ttft_ms']['p99']:.0f}",
             f"{s['itl_ms']['p50']:.0f}", f"{s['itl_ms']['p99']:.0f}", f"{s['tpot_ms']['p99']:.0f}",
             f"{s['handoff_gap_ms']['p50']:.0f}"]
    return "| " + " | ".join(cells) + " |"


def serving_table(report: dict[str, Any], kind: str) -> list[str]:
    head = ["system", "rate (req/s)", "ok", "errors", "req/s", "out tok/s", "goodput", "SLO met", "TTFT p50",
            "TTFT p99", "ITL p50", "ITL p99", "TPOT p99", "handoff gap p50"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for system in report["systems"]:
        lines.append(_row(system, "low (conc. 1)", report["systems"][system][kind]["low_load"]["summary"]))
        lines += [_row(system, rate, _s(report, system, kind, rate)) for rate in _rates(report, kind)]
    return lines


def offline_table(report: dict[str, Any]) -> list[str]:
    off = report.get("offline")
    if not off:
        return ["(transformers baseline skipped: --skip-transformers)"]
    lines = ["| what | output tok/s |", "|---|---|",
             f"| transformers `generate` (static batches of 8, offline, 2 threads) | "
             f"{off['transformers']['output_tokens_per_s']:.1f} |",
             f"| pd-serve engine, offline `LLM.generate` (2 threads) | {off['engine']['output_tokens_per_s']:.1f} |"]
    for system in report["systems"]:
        kinds = report["systems"][system]
        best = max(s["summary"]["output_throughput"] for k in kinds.values() for s in k["rates"].values())
        lines.append(f"| {LABEL[system]}, served, best over the rates above | {best:.1f} |")
    lines.append(f"\nOffline workload: {off['num_requests']} long-mix requests, all at once; "
                 f"engine / transformers = {off['ratio_engine_over_transformers']:.2f}x.")
    return lines


def node_metrics_lines(out_dir: Path) -> list[str]:
    """Sums and counts of the disaggregation histograms (prefill phases, decode handoff) from /metrics."""
    lines = []
    for path in sorted((out_dir / "metrics").glob("disaggregated-*.prom")):
        for line in path.read_text().splitlines():
            if line.startswith(("pd_node_prefill_phase_seconds_sum", "pd_node_prefill_phase_seconds_count",
                                "pd_node_kv_handoff_seconds_sum", "pd_node_kv_handoff_seconds_count")):
                lines.append(f"    {path.stem}: {line}")
    return lines


def markdown(report: dict[str, Any], out_dir: Path) -> str:
    m = report["meta"]
    out = [f"# colocated vs 1P1D: {out_dir.name}", "",
           f"{m['started']}, {m['machine']}, {m['cpus']} CPUs, demo model, transfer backend "
           f"{m['args']['transfer_backend']}. Load average (1/5/15 min) before: {m['load_average_before']}; "
           f"after: {m['load_average_after']}. Wall time {m['wall_s']} s.",
           f"SLOs: TTFT <= {m['slo_ttft_ms']} ms, TPOT <= {m['slo_tpot_ms']} ms. Latencies in ms. "
           f"Colocated torch threads: {m['args']['colocated_threads'] or 2}.",
           "Phases (s): " + ", ".join(f"{k} {v}" for k, v in m.get("phases", {}).items()), ""]
    t = targets(report)
    if t:
        out += ["## Targets (long-prompt mix)", "",
                f"- ITL p99 at {t['rate']} req/s ("
                + ("the highest rate colocated sustains" if t["colocated_sustains_it"]
                   else "colocated sustains no rate; the lowest") + f"): colocated {t['itl_p99_ms']['colocated']:.0f}, "
                f"1P1D {t['itl_p99_ms']['disaggregated']:.0f} (ratio {t['itl_p99_ms']['ratio']:.2f}; target <= 0.33): "
                + ("**holds**" if t["itl_target_holds"] else "**misses**"),
                f"- low-load TTFT p50: colocated {t['low_load_ttft_p50_ms']['colocated']:.0f}, 1P1D "
                f"{t['low_load_ttft_p50_ms']['disaggregated']:.0f} (ratio {t['low_load_ttft_p50_ms']['ratio']:.2f}; "
                f"target <= 1.25; mean ratio {t['low_load_ttft_mean_ms']['ratio']:.2f}): "
                + ("**holds**" if t["ttft_target_holds"] else "**misses**"), ""]
    for kind in report["systems"]["colocated"]:
        out += [f"## {kind}", "", *serving_table(report, kind), ""]
    out += ["## Throughput: transformers, colocated, disaggregated", "", *offline_table(report), ""]
    metrics = node_metrics_lines(out_dir)
    if metrics:
        out += ["## 1P1D node histograms (/metrics after the runs)", "", *metrics, ""]
    out += ["Plots: ttft_p99.png, itl_p99.png, goodput.png, latency_cdf.png. Raw data: results.json."]
    return "\n".join(out) + "\n"


def _per_rate_plot(report: dict[str, Any], out: Path, name: str, title: str, value: Any, ylabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(report["systems"]["colocated"])
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        rates = _rates(report, kind)
        for system in report["systems"]:
            ys = [value(_s(report, system, kind, r)) for r in rates]
            ax.plot([float(r) for r in rates], ys, marker="o", label=LABEL[system])
        if name == "goodput":
            ax.plot([float(r) for r in rates], [float(r) for r in rates], ls=":", c="grey", label="offered rate")
        ax.set(title=f"{title}: {kind}", xlabel="request rate (req/s)", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=110)
    plt.close(fig)


def _cdf_plot(report: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = targets(report)
    kind = t.get("workload") or next(iter(report["systems"]["colocated"]))
    rate = t.get("rate") or _rates(report, kind)[-1]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for system in report["systems"]:
        reqs = [r for r in report["systems"][system][kind]["rates"][rate]["requests"] if r["error"] is None]
        series = {"TTFT (ms)": [r["ttft_ms"] for r in reqs], "ITL (ms)": [g for r in reqs for g in r["itl_ms"]],
                  "end-to-end latency (ms)": [r["e2e_ms"] for r in reqs]}
        for ax, (label, xs) in zip(axes, series.items()):
            xs = sorted(xs)
            ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=LABEL[system])
            ax.set(xlabel=label, ylabel="fraction of samples", title=f"{label.split(' (')[0]} CDF, {kind} @ {rate}/s")
            ax.set_xscale("log" if xs and min(xs) > 0 and max(xs) / min(xs) > 50 else "linear")
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(out / "latency_cdf.png", dpi=110)
    plt.close(fig)


def write_plots(report: dict[str, Any], out: Path) -> None:
    _per_rate_plot(report, out, "ttft_p99", "TTFT p99", lambda s: s["ttft_ms"]["p99"], "TTFT p99 (ms)")
    _per_rate_plot(report, out, "itl_p99", "ITL p99", lambda s: s["itl_ms"]["p99"], "ITL p99 (ms)")
    _per_rate_plot(report, out, "goodput", "goodput", lambda s: s["goodput"], "goodput (req/s meeting both SLOs)")
    _cdf_plot(report, out)
