"""Drive `pd-serve up` (1P1D) and `pd-serve up --colocated` past capacity: does load queue or fail?

For each system (started here with the defaults a user gets, the trained model unless `--model`):
closed-loop levels at each `--concurrency` (requests of `--input-len` random prompt tokens and
`--output-len` output tokens, ignore_eos, streamed), then a Poisson ramp at each `--rates` value
(open loop, no concurrency cap: past capacity on purpose). Optionally (`--queue-limit N`) a third
system, 1P1D with `--frontend-arg=--max-queued-requests=N`, at the highest concurrency: the refused
requests must get 503 at once (their latency is reported) and nothing else may fail.

Per level: ok / 503 (refused before work) / other errors, output tok/s, TTFT and ITL p50/p99,
goodput (requests meeting `--slo-ttft-ms` and `--slo-tpot-ms`, if given). Writes
bench/results/overload/NAME/{results.json, results.md, overload.png} (the plot needs matplotlib),
and prints the issue-19 ratios: 1P1D/colocated TTFT p99 and output tok/s at `--compare-at`.

    python bench/bench_overload.py                         # smollm2, c=1,8,32,64, ramp 1,2,4 req/s
    python bench/bench_overload.py --model demo --concurrency 8 32 --rates 8 --name demo-quick
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import BenchConfig, make_client, send_request  # noqa: E402
from serving_metrics import RequestRecord, summarize  # noqa: E402
from upcluster import UpCluster  # noqa: E402
from workloads import Item, fixed_lengths  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


async def _level(cfg: BenchConfig, items: list[Item]) -> dict[str, Any]:
    """One closed-loop (cfg.concurrency) or open-loop (cfg.request_rate) level."""
    import random

    refused_ms: list[float] = []
    sem = asyncio.Semaphore(cfg.concurrency) if cfg.concurrency else None
    rng = random.Random(cfg.seed)

    async def one(client: Any, item: Item) -> RequestRecord:
        async with sem if sem is not None else _nothing():
            t = time.perf_counter()
            rec = await send_request(client, cfg, item)
            if rec.error == "http_503":
                refused_ms.append((time.perf_counter() - t) * 1000)
            return rec

    async with make_client(cfg) as client:
        t0 = time.perf_counter()
        tasks = []
        for item in items:
            if not math.isinf(cfg.request_rate):
                await asyncio.sleep(rng.expovariate(cfg.request_rate))
            tasks.append(asyncio.create_task(one(client, item)))
        records = list(await asyncio.gather(*tasks))
    duration = max((r.end or r.start for r in records), default=t0) - t0
    summary = summarize(records, duration, cfg.slo_ttft_ms, cfg.slo_tpot_ms)
    errors: dict[str, int] = dict(summary["errors"])  # type: ignore[call-overload]
    summary["refused_503"] = errors.pop("http_503", 0)
    summary["other_errors"] = sum(errors.values())
    summary["refused_ms_max"] = max(refused_ms, default=None)
    summary["error_examples"] = sorted({r.error_detail[:200] for r in records if r.error and r.error_detail})[:3]
    return summary


class _nothing:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


def run_system(name: str, up_args: list[str], args: argparse.Namespace, levels: list[tuple[str, int | None, float]]) -> dict[str, Any]:
    out: dict[str, Any] = {"up_args": up_args, "levels": {}}
    print(f"== {name}: pd-serve up {' '.join(up_args)}", flush=True)
    with UpCluster(up_args, restart=False) as up:
        for i, (label, concurrency, rate) in enumerate(levels):
            n = args.requests or max(8, 2 * (concurrency or 16))
            if concurrency is None:
                n = args.ramp_requests
            cfg = BenchConfig(base_url=up.url, model=args.served_name, request_rate=rate, concurrency=concurrency,
                              warmup=0, slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms,
                              timeout_s=args.timeout, seed=1000 + i)
            items = fixed_lengths(n, args.vocab, args.input_len, args.output_len, seed=1000 + i)
            if i == 0:  # warm-up, unrecorded
                asyncio.run(_level(BenchConfig(base_url=up.url, model=args.served_name, concurrency=2, warmup=0),
                                   fixed_lengths(4, args.vocab, args.input_len, 8, seed=7)))
            s = asyncio.run(_level(cfg, items))
            out["levels"][label] = s
            print(f"  {label:>8}: ok {s['completed']}/{s['num_requests']}, 503 {s['refused_503']}, "
                  f"other {s['other_errors']}, {s['output_throughput']:.1f} tok/s, TTFT p50/p99 "
                  f"{s['ttft_ms']['p50']:.0f}/{s['ttft_ms']['p99']:.0f} ms, ITL p50/p99 "
                  f"{s['itl_ms']['p50']:.0f}/{s['itl_ms']['p99']:.0f} ms", flush=True)
    return out


def markdown(results: dict[str, Any]) -> str:
    lines = [f"# Overload: {results['name']}", "", f"{results['machine']}; model {results['model']}; "
             f"{results['input_len']} prompt tokens, {results['output_len']} output tokens (ignore_eos), streamed.", "",
             "| system | level | ok | 503 (max ms) | other errors | out tok/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | goodput req/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for system, data in results["systems"].items():
        for label, s in data["levels"].items():
            refused = f"{s['refused_503']}" + (f" ({s['refused_ms_max']:.0f})" if s["refused_ms_max"] else "")
            lines.append(
                f"| {system} | {label} | {s['completed']}/{s['num_requests']} | {refused} | {s['other_errors']} | "
                f"{s['output_throughput']:.1f} | {s['ttft_ms']['p50']:.0f} | {s['ttft_ms']['p99']:.0f} | "
                f"{s['itl_ms']['p50']:.0f} | {s['itl_ms']['p99']:.0f} | {s['goodput']:.2f} |")
    if results.get("ratios"):
        lines += ["", "Ratios (1P1D / colocated): " + ", ".join(f"{k} {v:.3f}" for k, v in results["ratios"].items())]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for system, data in results["systems"].items():
        closed = [(int(k[2:]), v) for k, v in data["levels"].items() if k.startswith("c=")]
        if not closed:
            continue
        xs = [c for c, _ in closed]
        a.plot(xs, [v["output_throughput"] for _, v in closed], marker="o", label=system)
        b.plot(xs, [v["ttft_ms"]["p99"] for _, v in closed], marker="o", label=system)
    a.set(xlabel="concurrency", ylabel="output tok/s", xscale="log")
    b.set(xlabel="concurrency", ylabel="TTFT p99 (ms)", xscale="log", yscale="log")
    a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--served-name", default=None, help="the model name requests carry (default: --model)")
    ap.add_argument("--concurrency", type=int, nargs="*", default=[1, 8, 32, 64])
    ap.add_argument("--rates", type=float, nargs="*", default=[1.0, 2.0, 4.0], help="Poisson ramp, requests/s")
    ap.add_argument("--requests", type=int, default=None, help="requests per closed-loop level (default 2x c, >= 8)")
    ap.add_argument("--ramp-requests", type=int, default=48)
    ap.add_argument("--input-len", type=int, default=250)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=20000, help="random prompt ids are drawn below this")
    ap.add_argument("--queue-limit", type=int, default=None, help="also run 1P1D with this frontend queue limit")
    ap.add_argument("--systems", nargs="*", default=["1P1D", "colocated"], choices=["1P1D", "colocated"])
    ap.add_argument("--up-arg", action="append", default=[], help="an extra `pd-serve up` argument (named in the result)")
    ap.add_argument("--compare-at", type=int, default=32, help="concurrency of the 1P1D/colocated ratios")
    ap.add_argument("--slo-ttft-ms", type=float, default=None)
    ap.add_argument("--slo-tpot-ms", type=float, default=None)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per request")
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    args.served_name = args.served_name or ("demo" if args.model == "demo" else "smollm2" if args.model == "smollm2" else args.model)
    levels: list[tuple[str, int | None, float]] = [(f"c={c}", c, math.inf) for c in args.concurrency]
    levels += [(f"{r:g}/s", None, r) for r in args.rates]
    base = ["--model", args.model, *args.up_arg]
    systems = {"1P1D": base, "colocated": [*base, "--colocated"]}
    results: dict[str, Any] = {
        "name": args.name or f"{args.model}-{time.strftime('%Y%m%dT%H%M')}",
        "model": args.model, "input_len": args.input_len, "output_len": args.output_len,
        "machine": f"{platform.node()}: {_cpu()}, {len(__import__('os').sched_getaffinity(0))} cores",
        "git": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "systems": {},
    }  # fmt: skip
    for name in args.systems:
        results["systems"][name] = run_system(name, systems[name], args, levels)
    if args.queue_limit is not None:
        top = max(args.concurrency)
        limited = [*base, f"--frontend-arg=--max-queued-requests={args.queue_limit}"]
        results["systems"][f"1P1D queue {args.queue_limit}"] = run_system(
            f"1P1D queue {args.queue_limit}", limited, args, [(f"c={top}", top, math.inf)])
    at = f"c={args.compare_at}"
    pd, co = (results["systems"].get(s, {}).get("levels", {}).get(at) for s in ("1P1D", "colocated"))
    if pd and co:
        results["ratios"] = {f"TTFT p99 at {at}": pd["ttft_ms"]["p99"] / co["ttft_ms"]["p99"],
                             f"output tok/s at {at}": pd["output_throughput"] / co["output_throughput"]}
    out = ROOT / "bench" / "results" / "overload" / results["name"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "results.md").write_text(markdown(results))
    plot(results, out / "overload.png")
    print(markdown(results))
    print(f"written to {out}")


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    main()
