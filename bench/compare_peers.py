"""pd-serve against llama.cpp's `llama-server` on the same model and the same streamed workload; one run.

Systems, started one after another (never two at once), each measured at every `--concurrency`:
- `llama-f32`: llama-server on SmolLM2-135M-Instruct dequantized to F32, the very weights pd-serve computes
  with (`llama-quantize --allow-requantize ... F32`; `weight_diff` checks the claim): `-np` = the highest
  concurrency, `-c` = that many slots of `--ctx-per-slot` tokens, continuous batching, `-t --threads`;
- `llama-q4_1`: the same server on the original Q4_1 GGUF, as its users run it;
- `pd-colocated`: the `pd-serve colocated` node that `pd-serve up --colocated` starts (defaults, the trained
  model), measured at its own URL;
- `pd-1p1d`: `pd-serve up` with its defaults (1 prefill + 1 decode behind the frontend), at the frontend.

Calls, in order: `peers_llamacpp.ensure_build` (llama.cpp from the `llama-cpp-python` sdist, cached in
`--cache-dir`), `ensure_f32`, then per system: start, and per concurrency `timed_run` (bench_serving's
client: `--warmup` unrecorded requests, then the timed ones, at most c in flight); stop. Every system gets the
same text prompts on `/v1/completions` (about `--prompt-words` words, a distinct hash first so nothing
hits a prefix cache), `max_tokens` = `--max-tokens`, greedy, `ignore_eos`; a request is *verified* when
the server's usage and the streamed chunks both count `--max-tokens` tokens. Metrics are
serving_metrics.py's. Writes NAME.json, NAME.md and NAME.png (when matplotlib is installed) into
`--out-dir`: machine, versions, build flags, one row per system and concurrency, and the ratios of issue 20.

    python bench/compare_peers.py                                   # c = 1 4 16 64; 40-60 minutes
    python bench/compare_peers.py --concurrency 1 4 --requests 8 --name smoke   # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers_llamacpp as llama  # noqa: E402
import peers_report  # noqa: E402
from bench_latency import FILLER  # noqa: E402
from bench_serving import BenchConfig, _drive, make_client, send_request  # noqa: E402
from serving_metrics import RequestRecord, summarize  # noqa: E402
from upcluster import UpCluster  # noqa: E402
from workloads import Item  # noqa: E402

SYSTEMS = ("llama-f32", "llama-q4_1", "pd-colocated", "pd-1p1d")
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class PeerConfig:
    concurrency: tuple[int, ...] = (1, 4, 16, 64)
    requests: int | None = None  # per concurrency; None: max(16, 4 * c)
    warmup: int = 2
    prompt_words: int = 200  # about 250 SmolLM2 tokens with the hash and the closing line
    max_tokens: int = 64
    threads: int = 2
    ctx_per_slot: int = 512
    timeout_s: float = 900.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError(f"--concurrency {self.concurrency}: give one or more values >= 1")
        if self.requests is not None and self.requests < 1:
            raise ValueError(f"--requests {self.requests} must be >= 1")
        if self.ctx_per_slot < self.max_tokens + 2 * self.prompt_words:
            raise ValueError(
                f"--ctx-per-slot {self.ctx_per_slot} is below a prompt plus its output; raise it"
            )

    def requests_at(self, c: int) -> int:
        return self.requests if self.requests is not None else max(16, 4 * c)


def prompt_text(index: int, words: int, seed: int) -> str:
    """About `words` words, first a hash of (seed, index): no two prompts share a prefix-cache page."""
    tag = hashlib.sha256(f"{seed}:{index}".encode()).hexdigest()[:12]
    filler = " ".join((FILLER * (1 + words // len(FILLER.split()))).split()[:words])
    return f"{tag} {filler}\nSummarise the text above in one sentence."


def workload(cfg: PeerConfig) -> dict[int, tuple[list[Item], list[Item]]]:
    """concurrency -> (warmup items, timed items); the indices never repeat across levels."""
    out, index = {}, 0
    for c in cfg.concurrency:
        n = cfg.warmup + cfg.requests_at(c)
        items = [
            Item([], cfg.max_tokens, text=prompt_text(index + i, cfg.prompt_words, cfg.seed))
            for i in range(n)
        ]
        out[c], index = (items[: cfg.warmup], items[cfg.warmup :]), index + n
    return out


def drop_closing_chunk(rec: RequestRecord) -> RequestRecord:
    """llama-server closes a /v1/completions stream with a chunk of empty text that carries the finish
    reason and usage, which bench_serving counts as a token chunk: drop it where the chunks outnumber
    the usage's tokens by exactly one (pd-serve's streams never do)."""
    if rec.ok and rec.output_tokens is not None and len(rec.chunk_times) == rec.output_tokens + 1:
        rec.chunk_times.pop()
    return rec


def is_verified(rec: RequestRecord, max_tokens: int) -> bool:
    """Completed, and the server's usage and the streamed token chunks both count `max_tokens`."""
    return rec.ok and rec.output_tokens == max_tokens and len(rec.chunk_times) == max_tokens


async def timed_run(
    bench: BenchConfig, timed: list[Item], warm: list[Item]
) -> tuple[list[RequestRecord], float]:
    """bench_serving's client: the warm-up requests at once, then `timed` with at most c in flight."""
    async with make_client(bench) as client:
        await asyncio.gather(*(send_request(client, bench, it) for it in warm))
        t0 = time.perf_counter()
        records = await _drive(client, bench, timed, None)
    duration = max((r.end or r.start for r in records), default=t0) - t0
    return [drop_closing_chunk(r) for r in records], duration


def row(
    system: str, c: int, records: list[RequestRecord], duration: float, max_tokens: int
) -> dict[str, Any]:
    s = summarize(records, duration)
    done = max(1, int(s["completed"]))
    return {
        "system": system, "concurrency": c, "requests": len(records), "completed": s["completed"],
        "failed": s["failed"], "errors": s["errors"], "verified": sum(is_verified(r, max_tokens) for r in records),
        "prompt_tokens_mean": s["prompt_tokens"] / done, "duration_s": duration,
        "output_tok_s": s["output_throughput"], "ttft_p50_ms": s["ttft_ms"]["p50"], "ttft_p99_ms": s["ttft_ms"]["p99"],
        "itl_p50_ms": s["itl_ms"]["p50"], "itl_p99_ms": s["itl_ms"]["p99"], "tpot_p50_ms": s["tpot_ms"]["p50"],
    }  # fmt: skip


def served_model(url: str) -> str:
    with urllib.request.urlopen(f"{url}/v1/models", timeout=30) as r:
        return str(json.load(r)["data"][0]["id"])


def measure(
    system: str, url: str, cfg: PeerConfig, work: dict[int, tuple[list[Item], list[Item]]]
) -> list[dict[str, Any]]:
    model, rows = served_model(url), []
    for c in cfg.concurrency:
        warm, timed = work[c]
        bench = BenchConfig(
            base_url=url,
            model=model,
            endpoint="completions",
            concurrency=c,
            warmup=len(warm),
            timeout_s=cfg.timeout_s,
            seed=cfg.seed,
            progress=False,
        )
        records, duration = asyncio.run(timed_run(bench, timed, warm))
        rows.append(row(system, c, records, duration, cfg.max_tokens))
        r = rows[-1]
        print(
            f"{system} c={c}: {r['output_tok_s']:.1f} tok/s, TTFT p50 {r['ttft_p50_ms']:.0f} ms, ITL p50 "
            f"{r['itl_p50_ms']:.1f} ms, verified {r['verified']}/{r['requests']}",
            file=sys.stderr,
        )
    return rows


@contextmanager
def started(
    system: str,
    cfg: PeerConfig,
    models: dict[str, Path],
    build: llama.LlamaBuild,
    log_dir: Path,
    pd_args: list[str],
) -> Iterator[tuple[str, list[str]]]:
    """The system running; yields (the URL its clients use, the command that started it)."""
    if system.startswith("llama-"):
        port = llama.free_port()
        argv = llama.server_argv(
            build, models[system], port, max(cfg.concurrency), cfg.ctx_per_slot, cfg.threads, alias=system
        )
        with llama.llama_server(argv, port, log_dir, system, cfg.threads) as running:
            yield running
    else:
        args = ["--colocated", *pd_args] if system == "pd-colocated" else pd_args
        with UpCluster(args, log_dir=str(log_dir / system), restart=False) as up:
            url = up.url_of("colocated-0") if system == "pd-colocated" else up.url
            yield url, ["pd-serve", "up", *args, "#", *kv_pools(up)]


def kv_pools(up: UpCluster) -> list[str]:
    """Each node's KV pool as its engine logged it ('NAME: KV pools ...'): what c=64 can hold at once."""
    out = []
    for name, _ in up.nodes():
        lines = [ln for ln in up.log(name).splitlines() if "engine ready:" in ln]
        if lines:
            out.append(f"{name}: {lines[-1].split('engine ready:', 1)[1].strip()};")
    return out


def _git(*args: str) -> str:
    out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False)
    return out.stdout.strip()


def environment(build: llama.LlamaBuild, models: dict[str, Path]) -> dict[str, Any]:
    import torch

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    cpu = dict(ln.split(":", 1) for ln in lscpu.splitlines() if ":" in ln)
    return {
        "machine": {"cpu_model": cpu.get("Model name", "?").strip(), "cpus": os.cpu_count(),
                    "flags_avx": sorted(f for f in cpu.get("Flags", "").split() if f.startswith(("avx", "fma"))),
                    "platform": platform.platform(), "load_average_start": os.getloadavg()},
        "versions": {"pd_serve_git": _git("rev-parse", "HEAD"), "pd_serve_dirty": bool(_git("status", "--porcelain")),
                     "torch": torch.__version__, "python": platform.python_version(), "llama_cpp": build.as_json()},
        "models": {k: str(v) for k, v in models.items()},
    }  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = PeerConfig()
    ap.add_argument("--concurrency", type=int, nargs="+", default=list(d.concurrency))
    ap.add_argument(
        "--requests", type=int, default=None, help="timed requests per concurrency (default max(16, 4c))"
    )
    ap.add_argument(
        "--warmup", type=int, default=d.warmup, help="unrecorded requests before each concurrency"
    )
    ap.add_argument("--prompt-words", type=int, default=d.prompt_words)
    ap.add_argument("--max-tokens", type=int, default=d.max_tokens)
    ap.add_argument("--threads", type=int, default=d.threads, help="llama-server -t")
    ap.add_argument("--ctx-per-slot", type=int, default=d.ctx_per_slot, help="llama-server -c = slots x this")
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    ap.add_argument(
        "--pd-arg", action="append", default=[], help="an extra argument for both pd-serve systems' `up`"
    )
    ap.add_argument(
        "--cache-dir", type=Path, default=llama.DEFAULT_CACHE, help="llama.cpp sdist, build, F32 GGUF"
    )
    ap.add_argument(
        "--llama-cpp-version",
        default=None,
        help="llama-cpp-python sdist (default: newest in the cache, else PyPI's)",
    )
    ap.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results" / "peers")
    ap.add_argument("--name", default="cpu-2core-vm", help="result files NAME.json, NAME.md, NAME.png")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument(
        "--note", default="", help="a line for the top of NAME.md (the machine's state, the run's purpose)"
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from pd_serve.model.source import smollm2_gguf

    a = parse_args(argv)
    cfg = PeerConfig(
        tuple(a.concurrency),
        a.requests,
        a.warmup,
        a.prompt_words,
        a.max_tokens,
        a.threads,
        a.ctx_per_slot,
        seed=a.seed,
    )
    build = llama.ensure_build(a.cache_dir, a.llama_cpp_version)
    q4 = smollm2_gguf()
    models = {"llama-f32": llama.ensure_f32(build, q4, a.cache_dir), "llama-q4_1": q4}
    report: dict[str, Any] = {
        "config": asdict(cfg),
        "note": a.note,
        "pd_args": a.pd_arg,
        **environment(build, models),
    }
    if "llama-f32" in a.systems:
        report["f32_vs_q4_1_weights"] = llama.weight_diff(models["llama-f32"], q4)
    work, log_dir, rows = workload(cfg), a.cache_dir / "logs" / a.name, []
    report["load_average_1m"], report["commands"] = {}, {}
    for system in a.systems:
        t0, report["load_average_1m"][system] = time.monotonic(), os.getloadavg()[0]
        with started(system, cfg, models, build, log_dir, a.pd_arg) as (url, command):
            report["commands"][system] = command
            rows += measure(system, url, cfg, work)
        print(f"{system}: {time.monotonic() - t0:.0f} s; logs in {log_dir}", file=sys.stderr)
    report["rows"], report["ratios"] = rows, peers_report.ratios(rows)
    a.out_dir.mkdir(parents=True, exist_ok=True)
    (a.out_dir / f"{a.name}.json").write_text(json.dumps(report, indent=1) + "\n")
    md = peers_report.markdown(report)
    (a.out_dir / f"{a.name}.md").write_text(md)
    print(md)
    print(peers_report.plot(rows, a.out_dir / f"{a.name}.png"), file=sys.stderr)
    return 0 if all(r["verified"] == r["requests"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
