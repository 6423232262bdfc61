"""The latency the frontend adds: TTFT through `pd-serve frontend` minus TTFT of the same kind of
request sent by this script straight to the same prefill and decode pair (with `pd` fields).

A 1P1D cluster (tcp transfer, prefix caching off so that no request is helped by an earlier one)
runs behind one frontend. Requests alternate between the two paths, each with a prompt of its own,
one at a time; the frontend path is measured over HTTP/1.1 and over HTTP/2 (h2c). TTFT is the time
from sending the request to the first SSE chunk that carries a token. Prints JSON: p50 and p99 of each path
and of the per-pair differences (frontend minus the direct request next to it).

    python bench/bench_frontend.py [--num-requests 60] [--out bench/results/frontend/cpu.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_cluster import LocalCluster  # noqa: E402


def _body(i: int, pd: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "demo", "prompt": f"request {i}: the prefill node sends the first token",
                            "max_tokens": 2, "temperature": 0, "ignore_eos": True, "stream": True}
    if pd is not None:
        body["pd"] = pd
    return body


def _has_token(line: str) -> bool:
    """An SSE chunk that carries the first token (its text may be empty: a partial UTF-8 character)."""
    if not line.startswith("data: ") or line == "data: [DONE]":
        return False
    return bool(json.loads(line[6:])["choices"])


async def _ttft(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> float:
    start = time.perf_counter()
    async with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        lines = r.aiter_lines()
        async for line in lines:
            if _has_token(line):
                ttft = time.perf_counter() - start
                async for _ in lines:  # drain: the request ends cleanly
                    pass
                return ttft
    raise RuntimeError(f"{url}: the stream ended without a token")


async def _direct(client: httpx.AsyncClient, prefill: str, decode: str, i: int) -> float:
    pd = {"room": secrets.randbits(63), "prefill": "prefill-0", "decode": "decode-0"}
    p_task = asyncio.ensure_future(client.post(prefill + "/v1/completions", json={**_body(i, pd), "stream": False}))
    ttft = await _ttft(client, decode + "/v1/completions", _body(i, pd))
    (await p_task).raise_for_status()
    return ttft


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _summary(values: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values]
    return {"p50_ms": _pct(ms, 0.5), "p99_ms": _pct(ms, 0.99), "mean_ms": statistics.fmean(ms)}


async def measure(cluster: LocalCluster, n: int, http2: bool) -> dict[str, Any]:
    prefill, decode = cluster.nodes[0].url, cluster.nodes[1].url
    via, direct = [], []
    async with httpx.AsyncClient(http1=not http2, http2=http2, timeout=60) as front, \
            httpx.AsyncClient(timeout=60) as nodes:
        for i in range(3):  # warm-up both paths
            await _ttft(front, cluster.url + "/v1/completions", _body(10_000 + i))
            await _direct(nodes, prefill, decode, 20_000 + i)
        for i in range(n):
            base = (1 if http2 else 0) * 100_000 + 2 * i
            if i % 2:  # alternate which path goes first
                direct.append(await _direct(nodes, prefill, decode, base))
                via.append(await _ttft(front, cluster.url + "/v1/completions", _body(base + 1)))
            else:
                via.append(await _ttft(front, cluster.url + "/v1/completions", _body(base + 1)))
                direct.append(await _direct(nodes, prefill, decode, base))
    added = [a - b for a, b in zip(via, direct)]
    return {"frontend": _summary(via), "direct": _summary(direct), "added_per_pair": _summary(added),
            "added_p50_ms": _summary(via)["p50_ms"] - _summary(direct)["p50_ms"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-requests", type=int, default=60, help="per path and HTTP version")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-frontend-") as logs:
        engine_args = ["--disable-prefix-caching", "--max-total-tokens", "8192"]
        with LocalCluster("disaggregated", Path(logs), "tcp", engine_args) as cluster:
            result = {
                "num_requests": args.num_requests,
                "http1": asyncio.run(measure(cluster, args.num_requests, http2=False)),
                "http2": asyncio.run(measure(cluster, args.num_requests, http2=True)),
            }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
