"""Registrations and heartbeats per second of `pd-serve bootstrap` for N simulated nodes, per store.

For each store (memory, and redis on a throwaway redis-server) it starts the real service as a child
process on loopback, registers N nodes (PUT) with C requests in flight, sends R rounds of heartbeats
with a fresh load for every node, and times a full listing. The load generator is one asyncio process
using the same httpx stack as the client, on the same machine, so the figures are a lower bound on
what the service can take.

    python bench/bench_bootstrap.py [--nodes 1000] [--concurrency 32] [--rounds 3] [--stores memory,redis]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
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


async def run_all(
    requests: list[Callable[[], Awaitable[int]]], concurrency: int
) -> tuple[float, list[float]]:
    """Run the calls with `concurrency` in flight; wall seconds and per-call latencies."""
    queue = list(reversed(requests))
    latencies: list[float] = []

    async def worker() -> None:
        while queue:
            call = queue.pop()
            start = time.perf_counter()
            status = await call()
            latencies.append(time.perf_counter() - start)
            if status >= 300:
                raise RuntimeError(f"unexpected status {status}")

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start, latencies


async def measure(url: str, nodes: int, concurrency: int, rounds: int) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"content-type": "application/json"}
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30.0, headers=headers) as http:

        def put(i: int) -> Callable[[], Awaitable[int]]:
            body = registration(i)
            return lambda: _status(http.put(f"/v1/nodes/node-{i}", content=body))

        def beat(i: int, r: int) -> Callable[[], Awaitable[int]]:
            body = orjson.dumps({"load": {"running": r, "waiting": i % 7, "free_pages": 60000 - r}})
            return lambda: _status(http.post(f"/v1/nodes/node-{i}/heartbeat", content=body))

        reg_s, reg_lat = await run_all([put(i) for i in range(nodes)], concurrency)
        beats = [beat(i, r) for r in range(rounds) for i in range(nodes)]
        hb_s, hb_lat = await run_all(beats, concurrency)
        start = time.perf_counter()
        listed = len((await http.get("/v1/nodes")).json()["nodes"])
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


async def _status(call: Awaitable[httpx.Response]) -> int:
    return (await call).status_code


def _pct(values: list[float], pct: int) -> float:
    return statistics.quantiles(values, n=100)[pct - 1] if len(values) > 1 else values[0]


def bench_store(store: str, args: argparse.Namespace) -> dict[str, Any]:
    redis = RedisProcess() if store == "redis" else None
    flags = ["--node-ttl", "120", "--max-nodes", str(args.nodes * 2), "--log-level", "warning"]
    flags += ["--store", redis.url if redis is not None else "memory"]
    try:
        service = BootstrapProcess(args=flags)
        try:
            return {
                "store": store,
                **asyncio.run(measure(service.url, args.nodes, args.concurrency, args.rounds)),
            }
        finally:
            service.stop()
    finally:
        if redis is not None:
            redis.stop(graceful=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight")
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
    report = {"nodes": args.nodes, "concurrency": args.concurrency, "rounds": args.rounds, "results": results}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
