"""Soak: N minutes of mixed chat traffic against a `pd-serve up` cluster, then leaks and memory slopes.

    python bench/soak.py --minutes 10 [--prefill 1 --decode 1 --concurrency 8 --seed 0]

Clients send streamed and non-streamed chat requests back to back; `--disconnect` (default 20%) of
requests are abandoned at a random point (mid-stream, or before a non-streamed answer). Every few
seconds the resident memory (VmRSS from /proc) of every process of the cluster is sampled: each
child of `up` and its descendants (API supervisor, Granian worker, engine). At the end: the no-leak
check (`leakcheck.py`), and per process the RSS slope after the warm-up (least-squares line through
the samples, MiB/min) with its first and last RSS. The report (requests, outcomes by kind with the
expected cancellations apart, leaks, slopes) is printed and written to
bench/results/soak-<UTC date>.json and .md. Exit status 1 when a request hung or broke, a leak was
found, or a child exited.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from leakcheck import Leak, report, summary, wait_idle  # noqa: E402
from traffic import Traffic, TrafficConfig  # noqa: E402
from upcluster import UpCluster  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PAGE_KIB = 1024.0


# ---- memory sampling ----------------------------------------------------------------------------


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / PAGE_KIB
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def process_tree(root: int, children: dict[int, list[int]]) -> list[tuple[int, int]]:
    """(pid, depth) of `root` and its descendants, depth-first."""
    out, todo = [], [(root, 0)]
    while todo:
        pid, depth = todo.pop()
        out.append((pid, depth))
        todo.extend((c, depth + 1) for c in sorted(children.get(pid, []), reverse=True))
    return out


KINDS = {0: "main", 1: "worker", 2: "engine"}  # a node: supervisor -> Granian worker -> engine


def label(child: str, depth: int, index: int, cmdline: str = "") -> str:
    kind = "tracker" if "resource_tracker" in cmdline else KINDS.get(depth, f"depth{depth}")
    return f"{child}/{kind}" + (f"-{index}" if index else "")


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return ""


@dataclass
class MemorySampler:
    """Samples RSS of every process of the cluster every `interval` seconds, in a thread."""

    cluster: UpCluster
    interval: float
    series: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # label -> (t_s, MiB)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _cmdlines: dict[int, str] = field(default_factory=dict)
    t0: float = field(default_factory=time.monotonic)

    def start(self) -> MemorySampler:
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.interval + 5)

    def sample(self) -> None:
        now = time.monotonic() - self.t0
        children = _children_map()
        for name, info in self.cluster.children().items():
            seen: Counter[str] = Counter()
            for pid, depth in process_tree(int(info["pid"]), children):
                mib = rss_mib(pid)
                if mib is None:
                    continue
                base = label(name, depth, 0, self._cmdline(pid))
                key = label(name, depth, seen[base], self._cmdline(pid))
                seen[base] += 1
                self.series.setdefault(key, []).append((now, mib))

    def _cmdline(self, pid: int) -> str:
        if pid not in self._cmdlines:
            self._cmdlines[pid] = cmdline(pid)
        return self._cmdlines[pid]

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)


# ---- analysis (unit-tested) ---------------------------------------------------------------------


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MiB) points, in MiB per minute (0 with fewer than 2 points)."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    var = sum((t - mx) ** 2 for t, _ in points)
    if var == 0:
        return 0.0
    cov = sum((t - mx) * (v - my) for t, v in points)
    return cov / var * 60.0


def memory_table(series: dict[str, list[tuple[float, float]]], warmup_s: float) -> list[dict[str, Any]]:
    """Per process: RSS at the first sample after warm-up and at the last, and the slope after warm-up."""
    rows = []
    for name in sorted(series):
        after = [p for p in series[name] if p[0] >= warmup_s]
        if not after:
            continue
        rows.append(
            {
                "process": name,
                "samples": len(after),
                "start_mib": round(after[0][1], 1),
                "end_mib": round(after[-1][1], 1),
                "slope_mib_per_min": round(slope_per_minute(after), 3),
            }
        )
    return rows


def classify(outcomes: Counter[str]) -> dict[str, Any]:
    """Requests in all; successes; expected cancellations; clean errors by kind; hangs and breaks."""
    errors = {k: v for k, v in outcomes.items() if k.startswith("error:")}
    unclean = {k: v for k, v in outcomes.items() if k == "hang" or k.startswith("broken:")}
    return {
        "requests": sum(outcomes.values()),
        "ok": outcomes.get("ok", 0),
        "cancelled_by_client": outcomes.get("cancelled", 0),
        "errors": dict(sorted(errors.items())),
        "unclean": dict(sorted(unclean.items())),
    }


def markdown(result: dict[str, Any]) -> str:
    c, s = result["config"], result["summary"]
    lines = [
        f"# Soak {result['date']}",
        "",
        f"`{result['command']}`",
        "",
        f"{c['minutes']} min, {c['prefill']} prefill + {c['decode']} decode, {c['concurrency']} clients, "
        f"{c['disconnect']:.0%} of requests abandoned by their client, seed {c['seed']}, "
        f"warm-up {c['warmup_s']:.0f} s excluded from the slopes.",
        "",
        f"- requests: {s['requests']} (ok {s['ok']}, cancelled by the client {s['cancelled_by_client']})",
        f"- errors: {s['errors'] or 'none'}",
        f"- hung or broken: {s['unclean'] or 'none'}",
        f"- leaks after idle: {'none' if not result['leaks'] else result['leaks']}",
        f"- children that exited: {result['exits'] or 'none'}",
        "",
        "| process | samples | RSS start (MiB) | RSS end (MiB) | slope (MiB/min) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {r['process']} | {r['samples']} | {r['start_mib']} | {r['end_mib']} | {r['slope_mib_per_min']} |"
        for r in result["memory"]
    ]
    return "\n".join(lines) + "\n"


def verdict(result: dict[str, Any]) -> bool:
    return not (result["summary"]["unclean"] or result["leaks"] or result["exits"])


# ---- run --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, required=True)
    p.add_argument("--prefill", type=int, default=1)
    p.add_argument("--decode", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--disconnect", type=float, default=0.2, help="share of requests abandoned by the client")
    p.add_argument("--interval", type=float, default=3.0, help="seconds between RSS samples")
    p.add_argument(
        "--warmup", type=float, default=None, help="seconds left out of the slopes (default: 20%%)"
    )
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--transfer-backend", default="tcp", choices=("tcp", "cma", "ucx"))
    p.add_argument("--idle-timeout", type=float, default=60.0, help="seconds to wait for idle at the end")
    p.add_argument("--out", default=str(RESULTS), help="directory for soak-<date>.json/.md")
    return p.parse_args(argv)


def child_exits(cluster: UpCluster) -> list[str]:
    return [line.strip() for line in cluster.output().splitlines() if " exited with " in line]


def run(args: argparse.Namespace) -> dict[str, Any]:
    up_args = [
        "--model", "demo", "--num-prefill", str(args.prefill), "--num-decode", str(args.decode),
        "--transfer-backend", args.transfer_backend, "--seed", str(args.seed),
    ]  # fmt: skip
    duration = args.minutes * 60.0
    warmup = duration * 0.2 if args.warmup is None else args.warmup
    print(f"soak: starting pd-serve up ({args.prefill}P{args.decode}D)", flush=True)
    with UpCluster(up_args, restart=False) as cluster:
        sampler = MemorySampler(cluster, args.interval).start()
        config = TrafficConfig(
            clients=args.concurrency,
            disconnect_share=args.disconnect,
            max_words=120,
            max_tokens=(4, args.max_tokens),
            timeout=120.0,
            seed=args.seed,
            headers={},
        )
        traffic = Traffic(cluster.url, config).start()
        t_end = time.monotonic() + duration
        while time.monotonic() < t_end:
            time.sleep(min(30.0, max(0.0, t_end - time.monotonic())))
            done = sum(traffic.outcomes.values())
            print(f"soak: {done} requests, {dict(traffic.outcomes)}", flush=True)
        outcomes = traffic.stop()
        leaks: list[Leak] = wait_idle(cluster.nodes(), cluster.url, args.idle_timeout, cluster.headers)
        sampler.sample()
        sampler.stop()
        exits = child_exits(cluster)
    lat = sorted(traffic.latencies)
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
        "command": "python bench/soak.py " + " ".join(sys.argv[1:]),
        "config": {
            "minutes": args.minutes,
            "prefill": args.prefill,
            "decode": args.decode,
            "concurrency": args.concurrency,
            "seed": args.seed,
            "disconnect": args.disconnect,
            "warmup_s": warmup,
            "interval_s": args.interval,
            "transfer_backend": args.transfer_backend,
        },  # fmt: skip
        "summary": classify(outcomes),
        "ok_latency_p50_s": round(lat[len(lat) // 2], 3) if lat else None,
        "leaks": summary(leaks),
        "leak_report": report(leaks),
        "exits": exits,
        "memory": memory_table(sampler.series, warmup),
        "rss_series": {k: [[round(t, 1), round(v, 1)] for t, v in pts] for k, pts in sampler.series.items()},
    }


def write(result: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = "soak-" + result["date"].replace(":", "")
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    md_path.write_text(markdown(result))
    return json_path, md_path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    json_path, md_path = write(result, Path(args.out))
    print(markdown(result))
    print(f"soak: wrote {json_path} and {md_path}")
    return 0 if verdict(result) else 1


if __name__ == "__main__":
    sys.exit(main())
