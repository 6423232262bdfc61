"""Idle CPU of every process of a `pd-serve up` cluster: after a few requests, nothing should spin.

Starts `pd-serve up --model demo` (1 prefill + 1 decode, or `--colocated`) with `--transfer-backend B`,
sends `--requests` chat completions through the frontend (and notes each node's `transfer_peers`: the
backend each transfer connection chose), waits `--settle-s`, then reads the user and system clock
ticks of `up` and every descendant (`/proc/PID/stat`, bench/procfs.py) at the start and the end of
`--idle-s` idle seconds. Prints JSON (one row per process: pid, label, CPU % of one core)
and a Markdown table; `--out` also writes the JSON. A label is the `up` child the process belongs to
(bootstrap, prefill-0, decode-0, colocated-0, frontend) and its kind: supervisor (the process `up`
started: Granian's supervisor), api-worker (Granian's worker: the API process), engine (the engine
process), resource-tracker (multiprocessing's), other.

    python bench/idle_cpu.py --backend auto [--requests 4] [--idle-s 10] [--colocated] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from procfs import stat_fields  # noqa: E402
from upcluster import UpCluster  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
LIMIT_PCT = 2.0  # the target: every idle process under 2% of one core


def descendants(root: int) -> dict[int, list[str]]:
    """The stat fields of `root` and of every process below it (by parent pid)."""
    table = dict(stat_fields())
    children: dict[int, list[int]] = {}
    for pid, fields in table.items():
        children.setdefault(int(fields[1]), []).append(pid)
    found, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in table:
            found[pid] = table[pid]
            todo += children.get(pid, [])
    return found


def cpu_ticks(pids: list[int]) -> dict[int, int]:
    """User + system ticks of each pid still alive (fields 11 and 12 after the command name)."""
    out = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        out[pid] = int(fields[11]) + int(fields[12])
    return out


def kind(pid: int, parent_is_up: bool) -> str:
    """What a process of the cluster is, from its command line."""
    try:
        text = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return "gone"
    if "pd_serve.cli" in text:  # Granian's supervisor (started by up), then its API worker
        return "supervisor" if parent_is_up else "api-worker"
    if "spawn_main" in text:
        return "engine"
    if "resource_tracker" in text:
        return "resource-tracker"
    return "other"


def labels(up_pid: int, procs: dict[int, list[str]], names: dict[int, str]) -> dict[int, str]:
    """`child-name/kind` per pid, e.g. `prefill-0/engine`; `up` for the launcher itself."""
    out = {up_pid: "up"}
    for pid in procs:
        if pid == up_pid:
            continue
        top, parent = pid, int(procs[pid][1])
        while parent in procs and parent != up_pid:
            top, parent = parent, int(procs[parent][1])
        out[pid] = f"{names.get(top, f'pid {top}')}/{kind(pid, int(procs[pid][1]) == up_pid)}"
    return out


def send_requests(url: str, headers: dict[str, str], count: int, max_tokens: int) -> list[float]:
    """`count` chat completions one after the other; their latencies in seconds."""
    body = {"model": "demo", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": max_tokens,
            "ignore_eos": True}  # fmt: skip
    latencies = []
    for _ in range(count):
        req = urllib.request.Request(
            f"{url}/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={**headers, "Content-Type": "application/json"},
        )
        start = time.perf_counter()
        with urllib.request.urlopen(req, timeout=120) as r:
            r.read()
        latencies.append(time.perf_counter() - start)
    return latencies


def transfer_peers(cluster: UpCluster) -> dict[str, dict[str, str]]:
    """Per prefill/decode node, its open transfer connections and the backend each one chose."""
    out = {}
    for name, url in cluster.nodes():
        if name.startswith(("prefill", "decode")):
            req = urllib.request.Request(f"{url}/server_info", headers=cluster.headers)
            with urllib.request.urlopen(req, timeout=10) as r:
                out[name] = json.loads(r.read()).get("transfer_peers") or {}
    return out


def measure(cluster: UpCluster, idle_s: float) -> list[dict[str, Any]]:
    procs = descendants(cluster.popen.pid)
    names = {int(c["pid"]): name for name, c in cluster.children().items()}
    label = labels(cluster.popen.pid, procs, names)
    before = cpu_ticks(list(procs))
    start = time.monotonic()
    time.sleep(idle_s)
    elapsed = time.monotonic() - start
    after = cpu_ticks(list(procs))
    rows = [
        {
            "pid": pid,
            "label": label[pid],
            "cpu_pct": round(100 * (after[pid] - before[pid]) / TICKS / elapsed, 2),
        }
        for pid in procs
        if pid in before and pid in after
    ]
    return sorted(rows, key=lambda r: str(r["label"]))


def table(backend: str, rows: list[dict[str, Any]]) -> str:
    lines = [f"| process ({backend}) | pid | CPU % of one core |", "|---|---|---|"]
    lines += [f"| {r['label']} | {r['pid']} | {r['cpu_pct']:.2f} |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="auto", help="--transfer-backend of the nodes: auto|ucx|tcp|cma")
    parser.add_argument("--colocated", action="store_true", help="one colocated node instead of 1P1D")
    parser.add_argument(
        "--requests", type=int, default=4, help="chat completions sent before the idle window"
    )
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument(
        "--settle-s", type=float, default=3.0, help="seconds between the last answer and the window"
    )
    parser.add_argument("--idle-s", type=float, default=10.0, help="length of the idle window")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    up_args = [
        "--model",
        "demo",
        *(["--colocated"] if args.colocated else ["--transfer-backend", args.backend]),
    ]
    with UpCluster(up_args, restart=False) as cluster:
        latencies = send_requests(cluster.url, cluster.headers, args.requests, args.max_tokens)
        peers = transfer_peers(cluster)
        time.sleep(args.settle_s)
        rows = measure(cluster, args.idle_s)
    backend = "colocated" if args.colocated else args.backend
    report = {
        "backend": backend,
        "idle_s": args.idle_s,
        "request_latency_s": [round(x, 3) for x in latencies],
        "transfer_peers": peers,
        "processes": rows,
        "over_limit": [r["label"] for r in rows if r["cpu_pct"] >= LIMIT_PCT],
    }
    text = json.dumps(report, indent=1)
    print(text)
    print(table(backend, rows))
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
