"""Registrations and heartbeats per second of `pd-serve bootstrap` for N simulated nodes, per store.

For each store (memory, and redis on a throwaway redis-server) it starts the real service as a child
process on loopback, registers N nodes (PUT), sends R rounds of heartbeats with a fresh load for every
node, and times a full listing. The load comes from W processes, each with one keep-alive httpx
connection sending its share of the calls back to back (one asyncio process could not keep the
service busy). They share the machine with the service, so the figures are a lower bound.

    python bench/bench_bootstrap.py [--nodes 1000] [--workers 4] [--rounds 3] [--stores memory,redis]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from typing import Any

import httpx
import orjson

from pd_serve.bootstrap.process import BootstrapProcess, RedisProcess


def registration(i: int) -> bytes:
    role = "prefill" if i % 2 == 0 else "decode"
    return orjson.dumps(
        {
            "role": role,
            "http_url": f"http://10.0.{i // 250}.{i % 250}:8100",
            "transfer": [
                {"backend": "ucx", "address": f"10.0.{i // 250}.{i % 250}:{17000 + r}"} for r in range(2)
            ],
            "layout": {
                "architecture": "LlamaForCausalLM",
                "num_layers": 32,
                "num_kv_heads": 8,
                "head_dim": 128,
                "dtype": "bfloat16",
                "page_size": 16,
                "config_hash": "9f2c1e",
            },
            "capacity": {"total_pages": 65536, "max_running_requests": 256},
            "load": {"running": 0, "waiting": 0, "free_pages": 65536},
        }
    )


_http: httpx.Client | None = None  # one keep-alive connection per load-generator process


def _init_worker(url: str) -> None:
    global _http
    _http = httpx.Client(base_url=url, timeout=30.0, headers={"content-type": "application/json"})
    _http.get("/health")  # open the connection before the clock starts


def _timed(calls: list[tuple[str, str, bytes]]) -> tuple[float, float, list[float]]:
    """Send the calls in order; (start, end) wall clock and per-call latencies."""
    assert _http is not None
    latencies = []
    start = time.time()
    for method, path, body in calls:
        t0 = time.perf_counter()
        status = _http.request(method, path, content=body).status_code
        latencies.append(time.perf_counter() - t0)
        if status >= 300:
            raise RuntimeError(f"{method} {path}: unexpected status {status}")
    return start, time.time(), latencies


def run_phase(pool: Any, calls: list[tuple[str, str, bytes]], workers: int) -> tuple[float, list[float]]:
    """Spread the calls over the workers; seconds from the first start to the last end, and latencies."""
    results = pool.map(_timed, [calls[w::workers] for w in range(workers)])
    wall = max(end for _, end, _ in results) - min(start for start, _, _ in results)
    return wall, [lat for _, _, lats in results for lat in lats]


def measure(url: str, nodes: int, workers: int, rounds: int) -> dict[str, Any]:
    puts = [("PUT", f"/v1/nodes/node-{i}", registration(i)) for i in range(nodes)]
    beats = [
        (
            "POST",
            f"/v1/nodes/node-{i}/heartbeat",
            orjson.dumps({"load": {"running": r, "waiting": i % 7, "free_pages": 60000 - r}}),
        )
        for r in range(rounds)
        for i in range(nodes)
    ]
    with multiprocessing.get_context("spawn").Pool(
        workers, initializer=_init_worker, initargs=(url,)
    ) as pool:
        reg_s, reg_lat = run_phase(pool, puts, workers)
        hb_s, hb_lat = run_phase(pool, beats, workers)
    start = time.perf_counter()
    listed = len(httpx.get(f"{url}/v1/nodes", timeout=30.0).json()["nodes"])
    list_ms = (time.perf_counter() - start) * 1000
    if listed != nodes:
        raise RuntimeError(f"listed {listed} nodes, registered {nodes}")
    return {
        "registrations_per_s": round(nodes / reg_s, 1),
        "registration_p50_ms": round(_pct(reg_lat, 50) * 1000, 2),
        "registration_p99_ms": round(_pct(reg_lat, 99) * 1000, 2),
        "heartbeats_per_s": round(len(beats) / hb_s, 1),
        "heartbeat_p50_ms": round(_pct(hb_lat, 50) * 1000, 2),
        "heartbeat_p99_ms": round(_pct(hb_lat, 99) * 1000, 2),
        "list_all_ms": round(list_ms, 2),
    }


def _pct(values: list[float], pct: int) -> float:
    return statistics.quantiles(values, n=100)[pct - 1] if len(values) > 1 else values[0]


def bench_store(store: str, args: argparse.Namespace) -> dict[str, Any]:
    redis = RedisProcess() if store == "redis" else None
    flags = ["--node-ttl", "120", "--max-nodes", str(args.nodes * 2), "--log-level", "warning"]
    flags += ["--store", redis.url if redis is not None else "memory"]
    try:
        service = BootstrapProcess(args=flags)
        try:
            return {"store": store, **measure(service.url, args.nodes, args.workers, args.rounds)}
        finally:
            service.stop()
    finally:
        if redis is not None:
            redis.stop(graceful=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument(
        "--workers", type=int, default=4, help="load-generator processes (requests in flight)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="heartbeat rounds over all nodes")
    parser.add_argument("--stores", default="memory,redis")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    results = [bench_store(store, args) for store in args.stores.split(",")]
    for row in results:
        print(
            f"{row['store']:>6}: {row['registrations_per_s']:8.1f} registrations/s "
            f"(p50 {row['registration_p50_ms']} ms, p99 {row['registration_p99_ms']} ms), "
            f"{row['heartbeats_per_s']:8.1f} heartbeats/s (p50 {row['heartbeat_p50_ms']} ms, "
            f"p99 {row['heartbeat_p99_ms']} ms), list of {args.nodes}: {row['list_all_ms']} ms"
        )
    report = {"nodes": args.nodes, "workers": args.workers, "rounds": args.rounds, "results": results}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
