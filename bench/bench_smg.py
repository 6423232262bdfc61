"""What the SGLang Model Gateway (smg) adds against our frontend, in front of the same node pair.

Starts `pd-serve up` (bootstrap, one prefill and one decode node, our frontend; the defaults, the
trained model unless `--model`), then `smg launch --pd-disaggregation` in front of the same two nodes
(the prefill node's HTTP port as its bootstrap port; the cluster token as smg's `--api-key`, which
clients of smg present too). Per pass and per concurrency level, the same seeded streamed requests go
through each front door in turn (ours first, then smg; the next pass the other way round); TTFT and
ITL p50/p99 are the medians over `--passes`. Writes bench/results/smg/NAME.{json,md}.

    python bench/bench_smg.py                        # smollm2, c=1 and c=16, 3 passes
    python bench/bench_smg.py --model demo --name demo-quick --passes 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import BenchConfig, make_client, send_request  # noqa: E402
from serving_metrics import summarize  # noqa: E402
from upcluster import UpCluster, free_port, wait_for  # noqa: E402
from workloads import Item  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMG_READY_S = 120.0


class Smg:
    def __init__(self, prefill_url: str, decode_url: str, token: str, log: Path) -> None:
        binary = shutil.which("smg") or str(Path(sys.executable).parent / "smg")
        self.port, self.token = free_port(), token
        self.url = f"http://127.0.0.1:{self.port}"
        bootstrap_port = prefill_url.rsplit(":", 1)[1]  # the prefill node answers /pd_bootstrap on its HTTP port
        argv = [binary, "launch", "--pd-disaggregation", "--prefill", prefill_url, bootstrap_port,
                "--decode", decode_url, "--host", "127.0.0.1", "--port", str(self.port), "--api-key", token,
                "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()), "--log-level", "warn"]
        self.argv = argv[1:]
        self.popen = subprocess.Popen(argv, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self._ready, SMG_READY_S, f"smg on {self.url}", poll=0.5)

    def _ready(self) -> bool:
        if self.popen.poll() is not None:
            raise RuntimeError(f"smg exited with {self.popen.returncode}")
        req = urllib.request.Request(f"{self.url}/workers", headers={"Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                workers = json.loads(r.read()).get("workers", [])
        except OSError:
            return False
        return len(workers) == 2 and all(w.get("is_healthy") for w in workers)

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, 15)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, 9)


def text_items(n: int, words: int, output_len: int, seed: int) -> list[Item]:
    """Text prompts (smg takes no token-id prompts) of `words` random words each, unique per seed."""
    import random

    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    return [Item([], output_len, " ".join("".join(rng.choice(letters) for _ in range(rng.randint(3, 7)))
                                          for _ in range(words))) for _ in range(n)]


async def _run(cfg: BenchConfig, items: list[Item]) -> dict[str, Any]:
    sem = asyncio.Semaphore(cfg.concurrency or len(items))
    async with make_client(cfg) as client:

        async def one(item: Item) -> Any:
            async with sem:
                return await send_request(client, cfg, item)

        t0 = time.perf_counter()
        records = await asyncio.gather(*(one(i) for i in items))
    return summarize(records, time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--concurrency", type=int, nargs="*", default=[1, 16])
    ap.add_argument("--requests", type=int, default=16, help="requests per level, per pass, per front door")
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--words", type=int, default=100, help="random words per prompt (about 2.5 tokens each)")
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    served = "demo" if args.model == "demo" else "smollm2" if args.model == "smollm2" else args.model
    out_dir = ROOT / "bench" / "results" / "smg"
    out_dir.mkdir(parents=True, exist_ok=True)
    name = args.name or f"{args.model}-{time.strftime('%Y%m%dT%H%M')}"
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    with UpCluster(["--model", args.model], restart=False) as up:
        urls = dict(up.nodes())
        smg = Smg(urls["prefill-0"], urls["decode-0"], up.token, up.log_dir / "smg.log")
        try:
            doors = {"pd-serve frontend": (up.url, None), "smg": (smg.url, up.token)}
            for p in range(args.passes):
                order = list(doors) if p % 2 == 0 else list(reversed(doors))
                for c in args.concurrency:
                    for door in order:  # prompts of their own (the same ones would hit the prefix cache)
                        items = text_items(args.requests, args.words, args.output_len, seed=100 * p + c + 7 * len(door))
                        url, key = doors[door]
                        cfg = BenchConfig(base_url=url, model=served, concurrency=c, warmup=0, api_key=key, seed=p)
                        asyncio.run(_run(cfg, text_items(2, args.words, 4, seed=9000 + p)))  # warm-up
                        s = asyncio.run(_run(cfg, items))
                        runs.setdefault(f"c={c}", {}).setdefault(door, []).append(s)
                        print(f"pass {p + 1} c={c} {door}: ok {s['completed']}/{s['num_requests']}, TTFT p50/p99 "
                              f"{s['ttft_ms']['p50']:.1f}/{s['ttft_ms']['p99']:.1f} ms {s['errors'] or ''}", flush=True)
        finally:
            smg.stop()
        smg_argv = smg.argv
    med = {lvl: {door: {k: statistics.median(s[k.split(":")[0] + "_ms"][k.split(":")[1]] for s in ss)
                        for k in ("ttft:p50", "ttft:p99", "itl:p50", "itl:p99")}
                 for door, ss in doors_runs.items()} for lvl, doors_runs in runs.items()}
    failed = {lvl: {door: sum(s["failed"] for s in ss) for door, ss in d.items()} for lvl, d in runs.items()}
    lines = [f"# smg against the pd-serve frontend: {name}", "",
             f"Model {args.model}; prompts of {args.words} random words, {args.output_len} output tokens, streamed; "
             f"median of {args.passes} passes; smg `{' '.join(smg_argv).replace(up.token, 'TOKEN')}`.", "",
             "| level | front door | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | failed |", "|---|---|---|---|---|---|---|"]
    for lvl, d in med.items():
        for door, m in d.items():
            lines.append(f"| {lvl} | {door} | {m['ttft:p50']:.1f} | {m['ttft:p99']:.1f} | {m['itl:p50']:.1f} | "
                         f"{m['itl:p99']:.1f} | {failed[lvl][door]} |")
        ours, theirs = d["pd-serve frontend"], d["smg"]
        lines.append(f"| {lvl} | smg - ours | {theirs['ttft:p50'] - ours['ttft:p50']:+.1f} | "
                     f"{theirs['ttft:p99'] - ours['ttft:p99']:+.1f} | | | |")
    text = "\n".join(lines) + "\n"
    (out_dir / f"{name}.md").write_text(text)
    (out_dir / f"{name}.json").write_text(json.dumps({"median_ms": med, "failed": failed, "runs": runs}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
