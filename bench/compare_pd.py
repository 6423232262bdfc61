"""Colocated versus 1P1D on one machine, same model, same CPU budget, same workloads; one results page.

For each system this starts a local cluster of `python -m pd_serve.cli ROLE` processes (each in a
session of its own, stopped by process group at the end) behind `pd-serve frontend`:
- colocated: one `pd-serve colocated` node on CPUs 0-1 (`taskset -c 0-1`, 2 torch threads);
- disaggregated: bootstrap, one prefill node on CPU 0 and one decode node on CPU 1 (1 torch thread each).
Bootstrap, frontend and this load generator are not pinned (the same in both systems, so the frontend
hop costs both the same). Per workload it runs a low-load pass (`--concurrency 1`), then Poisson
arrivals at each `--rates` value, with the same seeded requests for both systems (a new seed per rate,
so no run hits the prefix cache of the one before). The SLOs default to 4x colocated's low-load TTFT
p90 and TPOT p90, measured first; goodput is DistServe's. Then bench_engine.py's offline comparison
(the engine against transformers `generate`) on the long-prompt mix, unless `--skip-transformers`.

Writes bench/results/NAME/: results.json (everything, raw per-request timings included), results.md
(the tables and the targets), ttft_p99.png, itl_p99.png, goodput.png, latency_cdf.png, the nodes'
/metrics after the runs (metrics/), the cluster logs (logs/) and, with `--profile`, py-spy profiles of
the nodes during the highest-rate run (profiles/). Needs matplotlib (`pip install matplotlib`).

    python bench/compare_pd.py --quick            # under 5 minutes on the 2-core CPU VM
    python bench/compare_pd.py --name cpu-full --rates 0.25 0.5 1 2 --num-requests 60
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_report  # noqa: E402
from bench_serving import BenchConfig, format_summary, make_workload, run_benchmark  # noqa: E402
from serving_cluster import SYSTEMS, LocalCluster  # noqa: E402
from workloads import long_prompt_mix  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def workload_items(kind: str, n: int, seed: int, vocab: int, short_outputs: bool = False) -> list[Any]:
    if kind == "long-mix" and short_outputs:  # --quick: the same prompts, shorter answers
        return long_prompt_mix(n, vocab, seed=seed, output=(8, 96), output_median=32)
    return make_workload(kind, n, vocab, seed)


def bench(url: str, items: list[Any], warm: list[Any], slo: tuple[float | None, float | None], **kw: Any) -> dict:
    cfg = BenchConfig(base_url=url, slo_ttft_ms=slo[0], slo_tpot_ms=slo[1], warmup=len(warm), progress=True, **kw)
    return asyncio.run(run_benchmark(cfg, items, warm))


def run_system(
    system: str, args: argparse.Namespace, out: Path, slo: list[float | None], phases: dict[str, float]
) -> dict[str, Any]:
    """Every workload and rate against one system; fills `slo` from colocated's low-load pass if unset."""
    results: dict[str, Any] = {}
    t0 = time.time()
    with LocalCluster(system, out / "logs", args.transfer_backend, args.engine_arg, args.colocated_threads) as cluster:
        phases[f"{system} start"] = round(time.time() - t0, 1)
        for w_index, kind in enumerate(args.workloads):
            seed = 1000 * w_index
            warm = workload_items("fixed", 2, seed + 999, args.vocab)
            low = bench(cluster.url, workload_items(kind, args.low_load_requests, seed, args.vocab, args.quick), warm,
                        (slo[0], slo[1]), concurrency=1)
            if slo[0] is None:  # colocated runs first: derive the SLOs from its low load
                slo[0] = round(4 * low["summary"]["ttft_ms"]["p90"], -1)
                slo[1] = round(4 * low["summary"]["tpot_ms"]["p90"], 0)
                low = compare_report.resummarize(low, slo[0], slo[1])
            print(format_summary(low, f"{system} {kind} low load (concurrency 1)"), flush=True)
            per_rate: dict[str, Any] = {}
            for r_index, rate in enumerate(args.rates):
                items = workload_items(kind, args.num_requests, seed + 1 + r_index, args.vocab, args.quick)
                top = r_index == len(args.rates) - 1 and kind == args.workloads[-1]
                with cluster.profiling(out / "profiles", enabled=args.profile and top):
                    res = bench(cluster.url, items, [], (slo[0], slo[1]), request_rate=rate, seed=seed + r_index)
                print(format_summary(res, f"{system} {kind} rate {rate:g}"), flush=True)
                per_rate[f"{rate:g}"] = res
                phases[f"{system} {kind} rate {rate:g}"] = round(res["summary"]["duration_s"], 1)
            results[kind] = {"low_load": low, "rates": per_rate}
        cluster.save_metrics(out / "metrics")
    return results


def transformers_baseline(args: argparse.Namespace) -> dict[str, Any]:
    """bench_engine.py's offline comparison (engine vs transformers) on the long-prompt mix."""
    import torch
    from bench_engine import run_engine, run_transformers

    from pd_serve.model.source import resolve_model_path

    torch.set_num_threads(2)
    items = workload_items("long-mix", args.offline_requests, 4242, args.vocab, args.quick)
    options = {"max_running_requests": 256, "chunked_prefill_size": 2048, "max_total_tokens": 1 << 16}
    engine = run_engine("demo", items, options)
    hf = run_transformers(resolve_model_path("demo"), items, batch_size=8)
    return {"workload": "long-mix", "num_requests": len(items), "torch_threads": 2, "engine": engine,
            "transformers": hf, "ratio_engine_over_transformers": engine["output_tokens_per_s"] / hf["output_tokens_per_s"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", default=None, help="results folder under bench/results (default: cpu-quick or cpu-full)")
    ap.add_argument("--quick", action="store_true",
                    help="long-prompt mix only (answers of 8-96 tokens), 3 rates, 6 requests each (< 5 min)")
    ap.add_argument("--workloads", nargs="+", default=None, choices=("sharegpt", "long-mix", "fixed"))
    ap.add_argument("--rates", nargs="+", type=float, default=None, help="request rates (req/s), ascending")
    ap.add_argument("--num-requests", type=int, default=None, help="requests per rate")
    ap.add_argument("--low-load-requests", type=int, default=None, help="requests of the concurrency-1 pass")
    ap.add_argument("--offline-requests", type=int, default=None, help="requests of the transformers comparison")
    ap.add_argument("--slo-ttft-ms", type=float, default=None, help="default: 4x colocated's low-load TTFT p90")
    ap.add_argument("--slo-tpot-ms", type=float, default=None, help="default: 4x colocated's low-load TPOT p90")
    ap.add_argument("--transfer-backend", default="tcp", choices=("ucx", "tcp", "cma"))
    ap.add_argument("--engine-arg", action="append", default=[], help="an extra engine flag for every node (repeat)")
    ap.add_argument("--colocated-threads", type=int, default=None,
                    help="torch threads of the colocated engine (default: 2, one per pinned core)")
    ap.add_argument("--vocab", type=int, default=256, help="synthetic prompt ids are 10..vocab-1")
    ap.add_argument("--skip-transformers", action="store_true", help="leave out the offline transformers baseline")
    ap.add_argument("--profile", action="store_true", help="py-spy record the nodes during the highest-rate run")
    a = ap.parse_args(argv)
    quick = {"workloads": ["long-mix"], "rates": [0.5, 1.0, 2.0], "num_requests": 6, "low_load_requests": 2,
             "offline_requests": 4}
    full = {"workloads": ["sharegpt", "long-mix"], "rates": [0.25, 0.5, 1.0, 2.0], "num_requests": 40,
            "low_load_requests": 8, "offline_requests": 48}
    for key, value in (quick if a.quick else full).items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    a.name = a.name or ("cpu-quick" if a.quick else "cpu-full")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    compare_report.require_matplotlib()
    out = RESULTS / args.name
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    meta: dict[str, Any] = {"args": vars(args), "machine": platform.platform(), "cpus": os.cpu_count(),
                            "load_average_before": load_average(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"load average before: {meta['load_average_before']}", flush=True)
    slo: list[float | None] = [args.slo_ttft_ms, args.slo_tpot_ms]
    phases: dict[str, float] = {}
    systems = {s: run_system(s, args, out, slo, phases) for s in SYSTEMS}
    t1 = time.time()
    offline = None if args.skip_transformers else transformers_baseline(args)
    phases["offline baseline"] = round(time.time() - t1, 1)
    meta.update(phases=phases, load_average_after=load_average(), wall_s=round(time.time() - t0, 1), slo_ttft_ms=slo[0],
                slo_tpot_ms=slo[1])
    print(f"load average after: {meta['load_average_after']}", flush=True)
    report = {"meta": meta, "systems": systems, "offline": offline}
    (out / "results.json").write_text(json.dumps(report, indent=1))
    compare_report.write_plots(report, out)
    md = compare_report.markdown(report, out)
    (out / "results.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the clusters' `with` blocks stop them
    sys.exit(main())
