"""Low-load latency: `pd-serve up` with its defaults against `pd-serve colocated`, same model, one run.

Starts two clusters side by side with `bench/upcluster.py`: `pd-serve up --model M` (the defaults a
user gets: 1 prefill + 1 decode, `--transfer-backend auto`, behind the frontend) and `pd-serve up
--model M --colocated`, whose colocated node is measured directly at its own URL, as a user of
`pd-serve colocated` talks to it (and, for the record, also through that cluster's frontend). Both are
idle between requests (bench/idle_cpu.py), so running them side by side costs nothing, and
alternating one request to each system keeps the machine's noise the same for both.

Each pass sends `--requests` streamed chat completions to every system at concurrency 1 through the
official openai client (temperature 0, `max_tokens`, `ignore_eos`; a new nonce at the start of every
prompt so no request hits a prefix cache), after `--warmup` unrecorded ones. TTFT is the time from
sending to the first chunk that carries a token (every chunk of a pd-serve stream is one engine delta,
its `content` a string, empty while a multi-byte character is incomplete); ITL the gaps between later
chunks. Per pass it
takes the p50 of each and the ratio up/colocated; the result is the median over `--passes` passes.
Targets (issue 16): TTFT ratio <= 1.25, ITL ratio <= 1.10. Prints a Markdown table; `--out` writes
the JSON (every pass, every request).

    python bench/bench_latency.py --model demo
    python bench/bench_latency.py --model smollm2 --out bench/results/latency/smollm2.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))
from upcluster import UpCluster  # noqa: E402

TARGETS = {"ttft": 1.25, "itl": 1.10}
FILLER = (
    "Our team keeps a small garden behind the office. In spring we plant tomatoes, beans and basil, "
    "and in autumn we collect the seeds for the next year. "
)


def prompt(words: int) -> str:
    """A chat prompt of about `words` words that starts with a nonce (no prefix-cache hits)."""
    text = (FILLER * (1 + words // len(FILLER.split())))[: words * 6]
    return f"[{uuid.uuid4().hex}] {text}\nSummarise the text above in one sentence."


def one_request(client: openai.OpenAI, model: str, words: int, max_tokens: int) -> dict[str, Any]:
    """One streamed chat completion: TTFT and the inter-token gaps, in milliseconds."""
    start = time.perf_counter()
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt(words)}],
        max_tokens=max_tokens,
        temperature=0.0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    stamps = [time.perf_counter() for chunk in stream if chunk.choices and chunk.choices[0].delta.content is not None]
    if not stamps:
        raise RuntimeError(f"{client.base_url}: a stream with no tokens")
    gaps = [1000 * (b - a) for a, b in zip(stamps, stamps[1:], strict=False)]
    return {"ttft_ms": 1000 * (stamps[0] - start), "itl_ms": gaps, "chunks": len(stamps)}


def p50s(records: list[dict[str, Any]]) -> dict[str, float]:
    return {
        "ttft_p50_ms": statistics.median(r["ttft_ms"] for r in records),
        "itl_p50_ms": statistics.median(g for r in records for g in r["itl_ms"]),
    }


def run_pass(
    clients: dict[str, openai.OpenAI], model: str, args: argparse.Namespace
) -> dict[str, dict[str, Any]]:
    records: dict[str, list[dict[str, Any]]] = {name: [] for name in clients}
    for i in range(args.warmup + args.requests):
        for name, client in clients.items():  # alternate: one request to each system in turn
            rec = one_request(client, model, args.prompt_words, args.max_tokens)
            if i >= args.warmup:
                records[name].append(rec)
    return {name: {**p50s(recs), "requests": recs} for name, recs in records.items()}


def ratios(result: dict[str, dict[str, Any]], base: str = "colocated") -> dict[str, float]:
    return {
        "ttft": result["up"]["ttft_p50_ms"] / result[base]["ttft_p50_ms"],
        "itl": result["up"]["itl_p50_ms"] / result[base]["itl_p50_ms"],
    }


def table(model: str, passes: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    lines = [
        f"| {model}: system | TTFT p50 (ms) | ITL p50 (ms) |",
        "|---|---|---|",
    ]
    for name in passes[0]["systems"]:
        ttft = statistics.median(p["systems"][name]["ttft_p50_ms"] for p in passes)
        itl = statistics.median(p["systems"][name]["itl_p50_ms"] for p in passes)
        lines.append(f"| {name} | {ttft:.1f} | {itl:.2f} |")
    lines.append(
        f"| **up / colocated** (median of {len(passes)} passes) | **{summary['ttft']:.3f}** "
        f"(target <= {TARGETS['ttft']}) | **{summary['itl']:.3f}** (target <= {TARGETS['itl']}) |"
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="--model of both clusters (demo, smollm2, a path)")
    parser.add_argument("--passes", type=int, default=3, help="passes; the result is their median")
    parser.add_argument("--requests", type=int, default=8, help="recorded requests per system per pass")
    parser.add_argument("--warmup", type=int, default=2, help="unrecorded requests per system per pass")
    parser.add_argument("--prompt-words", type=int, default=150, help="about this many words per prompt")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--up-arg", action="append", default=[], help="an extra argument for `pd-serve up` (named in the result)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    with (
        UpCluster(["--model", args.model, *args.up_arg], restart=False) as up,
        UpCluster(["--model", args.model, "--colocated"], restart=False) as colo,
    ):
        served = openai.OpenAI(base_url=f"{up.url}/v1", api_key="none").models.list().data[0].id
        clients = {
            "up": openai.OpenAI(base_url=f"{up.url}/v1", api_key="none", max_retries=0, timeout=300),
            "colocated": openai.OpenAI(base_url=f"{colo.url_of('colocated-0')}/v1", api_key="none", max_retries=0, timeout=300),
            "colocated via frontend": openai.OpenAI(base_url=f"{colo.url}/v1", api_key="none", max_retries=0, timeout=300),
        }  # fmt: skip
        passes = []
        for n in range(args.passes):
            systems = run_pass(clients, served, args)
            passes.append({"systems": systems, "ratios": ratios(systems)})
            r = passes[-1]["ratios"]
            print(f"pass {n + 1}: TTFT ratio {r['ttft']:.3f}, ITL ratio {r['itl']:.3f}", file=sys.stderr)
    summary = {k: statistics.median(p["ratios"][k] for p in passes) for k in TARGETS}
    report = {
        "model": args.model,
        "served_model": served,
        "up_args": args.up_arg,
        "settings": {k: getattr(args, k) for k in ("passes", "requests", "warmup", "prompt_words", "max_tokens")},
        "ratios_median": summary,
        "targets": TARGETS,
        "met": {k: summary[k] <= TARGETS[k] for k in TARGETS},
        "passes": passes,
    }
    print(table(args.model, passes, summary))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
