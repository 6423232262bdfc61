"""The page bench/compare_peers.py writes: issue 20's ratios, the Markdown table, the plot.

Pure functions of the result rows (one dict per system and concurrency: `compare_peers.row`), so tests
feed them made-up rows; only `plot` touches the disk, and it skips with a message when matplotlib is
not installed rather than asking for it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

BASE = "llama-f32"
OURS = "pd-colocated"
# issue 20's targets: (metric, concurrency, the bound on ours / llama-f32, "max" or "min")
TARGETS = (("itl_p50_ms", 1, 1.0, "max"), ("output_tok_s", 16, 1.5, "min"), ("output_tok_s", 64, 1.5, "min"))
COLUMNS = (
    ("output_tok_s", "out tok/s", 1), ("ttft_p50_ms", "TTFT p50 (ms)", 0), ("ttft_p99_ms", "TTFT p99 (ms)", 0),
    ("itl_p50_ms", "ITL p50 (ms)", 1), ("itl_p99_ms", "ITL p99 (ms)", 1),
)  # fmt: skip


def find(rows: list[dict[str, Any]], system: str, c: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["system"] == system and r["concurrency"] == c), None)


def ratio(
    rows: list[dict[str, Any]], metric: str, c: int, ours: str = OURS, base: str = BASE
) -> float | None:
    """ours / base for `metric` at concurrency `c`; None when either row is missing or base is 0/NaN."""
    a, b = find(rows, ours, c), find(rows, base, c)
    if a is None or b is None or not b[metric] or math.isnan(b[metric]):
        return None
    return float(a[metric] / b[metric])


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 20's ratios of pd-colocated to llama-f32 (and, for the record, to llama-q4_1)."""
    out = []
    for metric, c, bound, kind in TARGETS:
        for base in (BASE, "llama-q4_1"):
            value = ratio(rows, metric, c, OURS, base)
            met = (
                None
                if value is None or base != BASE
                else (value <= bound if kind == "max" else value >= bound)
            )
            out.append(
                {
                    "metric": metric,
                    "concurrency": c,
                    "base": base,
                    "ratio": value,
                    "target": f"{'<=' if kind == 'max' else '>='} {bound}" if base == BASE else None,
                    "met": met,
                }
            )
    return out


def _cell(value: float | None, digits: int) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def table(rows: list[dict[str, Any]]) -> str:
    head = "| system | c | " + " | ".join(label for _, label, _ in COLUMNS) + " | verified | prompt tok |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 4)]
    for r in rows:
        cells = " | ".join(_cell(r[key], digits) for key, _, digits in COLUMNS)
        lines.append(
            f"| {r['system']} | {r['concurrency']} | {cells} | {r['verified']}/{r['requests']} | "
            f"{_cell(r['prompt_tokens_mean'], 0)} |"
        )
    return "\n".join(lines)


def ratio_table(items: list[dict[str, Any]]) -> str:
    lines = ["| pd-colocated / | metric | c | ratio | target | met |", "|---|---|---|---|---|---|"]
    for it in items:
        met = "-" if it["met"] is None else ("yes" if it["met"] else "no")
        lines.append(
            f"| {it['base']} | {it['metric']} | {it['concurrency']} | {_cell(it['ratio'], 3)} | "
            f"{it['target'] or '(for the record)'} | {met} |"
        )
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    m, v = report["machine"], report["versions"]
    b, cfg = v["llama_cpp"], report["config"]
    w = report.get("f32_vs_q4_1_weights", {})
    return "\n".join([
        "# pd-serve against llama.cpp (bench/compare_peers.py)", "",
        *([f"> {report['note']}", ""] if report.get("note") else []),
        f"- machine: {m['cpu_model']}, {m['cpus']} CPUs; load average at start {m['load_average_start'][0]:.2f}",
        f"- pd-serve {v['pd_serve_git'][:12]}{' (dirty)' if v['pd_serve_dirty'] else ''}, torch {v['torch']}, "
        f"python {v['python']}",
        f"- llama.cpp {b['commit']} (llama-cpp-python {b['version']} sdist), {b['compiler']}; "
        f"cmake {' '.join(b['cmake_flags'])}",
        f"- workload: /v1/completions, streamed, about {cfg['prompt_words']} words a prompt, {cfg['max_tokens']} "
        f"output tokens (ignore_eos, greedy), {cfg['warmup']} warmup requests per concurrency; "
        f"llama-server -t {cfg['threads']}, -np {max(cfg['concurrency'])}, {cfg['ctx_per_slot']} tokens a slot",
        "- load average (1 min) as each system started: "
        + ", ".join(f"{k} {x:.2f}" for k, x in report.get("load_average_1m", {}).items()),
        f"- F32 GGUF against the Q4_1 one, both dequantized: max |diff| {w.get('max_abs_diff', '-')} over "
        f"{w.get('tensors', '-')} tensors", "",
        table(report["rows"]), "", ratio_table(report["ratios"]), "", "Commands:", "",
        *(f"- {system}: `{' '.join(argv)}`" for system, argv in report.get("commands", {}).items()), "",
    ])  # fmt: skip


def plot(rows: list[dict[str, Any]], path: Path) -> str:
    """Four panels against concurrency; returns what it did (a path, or why it skipped)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"no plot: matplotlib is not installed (pip install matplotlib to get {path.name})"
    panels = (("output_tok_s", "output tok/s"), ("ttft_p50_ms", "TTFT p50 (ms)"), ("itl_p50_ms", "ITL p50 (ms)"),
              ("itl_p99_ms", "ITL p99 (ms)"))  # fmt: skip
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (key, label) in zip(axes.flat, panels):
        for system in dict.fromkeys(r["system"] for r in rows):
            pts = sorted((r["concurrency"], r[key]) for r in rows if r["system"] == system)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=system)
        ax.set_xscale("log", base=2)
        levels = sorted({r["concurrency"] for r in rows})
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrency")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes.flat[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot: {path}"
