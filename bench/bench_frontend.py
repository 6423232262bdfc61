"""The latency the frontend adds: TTFT through `pd-serve frontend` minus TTFT of the same kind of
request sent by this script straight to the same prefill and decode pair (with `pd` fields).

A 1P1D cluster (tcp transfer, prefix caching off so that no request is helped by an earlier one)
runs behind one frontend. Requests alternate between the two paths, each with a prompt of its own,
one at a time. The client's own cost must be the same on both sides of the difference, and the
direct path sends two requests where the frontend path sends one; so every request whose client
cost is not the protocol under test goes through the frontend's own `NodePool` (keep-alive HTTP/1.1,
about a tenth of httpx's Python per request): over HTTP/1.1 all of them; over HTTP/2 (h2c, which
the nodes serve too) the frontend path and the direct decode request use httpx with HTTP/2, the
direct prefill request `NodePool`. The HTTP/2 run also keeps a direct pair over HTTP/1.1 beside each
(`added_vs_http1_direct`). With httpx on the direct path (the first version of this script) its
second request made the direct side slower by about an httpx request, more on a loaded machine,
which hid part of the frontend's cost. TTFT is the time from sending the request to the first SSE
chunk that carries a token. Prints JSON: p50 and p99 of each path and of the
per-pair differences (frontend minus the direct request next to it), the CPU time the frontend's
processes used per request (`frontend_cpu_ms_per_request`, from /proc: what the machine's load does
not change), and the load average.

    python bench/bench_frontend.py [--num-requests 60] [--out bench/results/frontend/cpu.json]
        [--profile /tmp/frontend-profile.txt]   # py-spy (collapsed stacks) of the frontend meanwhile
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from pd_serve.frontend.node_pool import NodePool

sys.path.insert(0, str(Path(__file__).resolve().parent))
from procfs import stat_fields  # noqa: E402
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


JSON = [(b"content-type", b"application/json")]


async def _ttft_pool(pool: NodePool, url: str, body: dict[str, Any]) -> float:
    payload = json.dumps(body).encode()
    start = time.perf_counter()
    r = await pool.open(url, payload, JSON)
    try:
        if r.status != 200:
            raise RuntimeError(f"{url}: {r.status} {(await r.read())[:300]!r}")
        ttft, rest = 0.0, b""
        async for chunk in r.chunks():  # read to the end: the connection goes back to the pool
            if not ttft:
                *lines, rest = (rest + chunk).split(b"\n")
                if any(_has_token(line.decode()) for line in lines):
                    ttft = time.perf_counter() - start
    finally:
        await r.aclose()
    if not ttft:
        raise RuntimeError(f"{url}: the stream ended without a token")
    return ttft


async def _prefill(pool: NodePool, url: str, body: dict[str, Any]) -> None:
    status, answer = await pool.post(url, json.dumps(body).encode(), JSON)
    if status != 200:
        raise RuntimeError(f"{url}: {status} {answer[:300]!r}")


async def _direct(client: httpx.AsyncClient | NodePool, pool: NodePool, prefill: str, decode: str, i: int) -> float:
    """D's request (over `client`) and P's (over `pool`) at once, as the frontend sends them; D's TTFT."""
    pd = {"room": secrets.randbits(63), "prefill": "prefill-0", "decode": "decode-0"}
    url = decode + "/v1/completions"
    d = _ttft_pool(client, url, _body(i, pd)) if isinstance(client, NodePool) else _ttft(client, url, _body(i, pd))
    d_task = asyncio.ensure_future(d)  # D first: the frontend's order
    p_task = asyncio.ensure_future(_prefill(pool, prefill + "/v1/completions", {**_body(i, pd), "stream": False}))
    ttft = await d_task
    await p_task
    return ttft


def _cpu_seconds(root: int) -> float:
    """User + system CPU time of `root` and every process below it (/proc), in seconds."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for pid, fields in stat_fields():
        parents[pid] = int(fields[1])
        times[pid] = (int(fields[11]) + int(fields[12])) / tick
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += times.get(pid, 0.0)
        todo += [child for child, parent in parents.items() if parent == pid]
    return total


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _summary(values: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values]
    return {"p50_ms": _pct(ms, 0.5), "p99_ms": _pct(ms, 0.99), "mean_ms": statistics.fmean(ms)}


async def measure(cluster: LocalCluster, n: int, http2: bool) -> dict[str, Any]:
    prefill, decode = cluster.nodes[0].url, cluster.nodes[1].url
    front_pid = next(c for c in cluster.children if c.name == "frontend").popen.pid
    url = cluster.url + "/v1/completions"
    via: list[float] = []
    direct: list[float] = []
    direct_h1: list[float] = []
    pool = NodePool(connect_timeout=10, read_timeout=60)
    async with httpx.AsyncClient(http1=False, http2=True, timeout=60) as h2:

        def front(i: int) -> Any:
            return _ttft(h2, url, _body(i)) if http2 else _ttft_pool(pool, url, _body(i))

        nodes: httpx.AsyncClient | NodePool = h2 if http2 else pool
        for i in range(3):  # warm-up every path
            await front(10_000 + i)
            await _direct(nodes, pool, prefill, decode, 20_000 + i)
            await _direct(pool, pool, prefill, decode, 30_000 + i)
        cpu = _cpu_seconds(front_pid)
        for i in range(n):
            base = (1 if http2 else 0) * 100_000 + 3 * i
            steps = [lambda b=base: front(b), lambda b=base: _direct(nodes, pool, prefill, decode, b + 1)]
            if http2:
                steps.append(lambda b=base: _direct(pool, pool, prefill, decode, b + 2))
            order = list(range(len(steps)))
            order = order[i % len(order):] + order[:i % len(order)]  # rotate which path goes first
            got = {k: await steps[k]() for k in order}
            via.append(got[0])
            direct.append(got[1])
            if http2:
                direct_h1.append(got[2])
        cpu = _cpu_seconds(front_pid) - cpu
    await pool.aclose()
    result = {"frontend": _summary(via), "direct": _summary(direct),
              "added_per_pair": _summary([a - b for a, b in zip(via, direct)]),
              "added_p50_ms": _summary(via)["p50_ms"] - _summary(direct)["p50_ms"],
              "frontend_cpu_ms_per_request": cpu * 1000 / n}
    if http2:
        result["direct_http1"] = _summary(direct_h1)
        result["added_vs_http1_direct"] = _summary([a - b for a, b in zip(via, direct_h1)])
    return result


@contextlib.contextmanager
def _profiled(cluster: LocalCluster, out: str | None) -> Iterator[None]:
    """py-spy record of the frontend (its Granian worker included) while the block runs; --nonblocking,
    since pausing the process to sample it would add to the latency measured."""
    if not out:
        yield
        return
    front = next(c for c in cluster.children if c.name == "frontend")
    spy = subprocess.Popen(["py-spy", "record", "--pid", str(front.popen.pid), "--subprocesses", "--nonblocking",
                            "--format", "raw", "--rate", "200", "--output", out],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        spy.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-requests", type=int, default=60, help="per path and HTTP version")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--profile", default=None, help="py-spy the frontend into this file (collapsed stacks)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-frontend-") as logs:
        engine_args = ["--disable-prefix-caching", "--max-total-tokens", "8192"]
        with LocalCluster("disaggregated", Path(logs), "tcp", engine_args) as cluster, \
                _profiled(cluster, args.profile):
            result = {
                "num_requests": args.num_requests,
                "loadavg_before": os.getloadavg(),
                "http1": asyncio.run(measure(cluster, args.num_requests, http2=False)),
                "http2": asyncio.run(measure(cluster, args.num_requests, http2=True)),
                "loadavg_after": os.getloadavg(),
            }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
