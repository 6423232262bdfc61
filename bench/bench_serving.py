"""Load generator for any OpenAI-compatible server: streaming requests, latency and goodput.

Sends a seeded workload (bench/workloads.py, or a JSONL file) to `/v1/completions` (token-id or text
prompts) or `/v1/chat/completions` (text prompts), streaming, over HTTP/1.1 or HTTP/2 (`--http2`:
h2c by prior knowledge on http://, ALPN on https://). Arrivals are Poisson at `--request-rate`
(inf: all at once), optionally capped at `--concurrency` in flight. `--warmup` requests go first and
are not counted. Prints a one-screen table and writes JSON (`--output`) with the summary and every
request's timings. The metric definitions live in serving_metrics.py.

    python bench/bench_serving.py --base-url http://127.0.0.1:8000 --workload long-mix \\
        --num-requests 200 --request-rate 2 --slo-ttft-ms 1000 --slo-tpot-ms 100 --output run.json

Requests carry `ignore_eos` (vLLM/SGLang/pd-serve extension) so outputs have the asked length;
`--no-ignore-eos` leaves it out for servers that refuse unknown fields.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_metrics import RequestRecord, summarize  # noqa: E402
from workloads import Item, fixed_lengths, from_jsonl, long_prompt_mix, sharegpt_like  # noqa: E402

WORKLOADS = ("sharegpt", "long-mix", "fixed", "jsonl")


@dataclass(frozen=True)
class BenchConfig:
    base_url: str
    model: str = "demo"
    endpoint: str = "completions"  # completions | chat
    request_rate: float = math.inf
    concurrency: int | None = None
    warmup: int = 2
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    http2: bool = False
    timeout_s: float = 600.0
    seed: int = 0
    ignore_eos: bool = True
    progress: bool = True
    api_key: str | None = None

    def __post_init__(self) -> None:
        if self.endpoint not in ("completions", "chat"):
            raise ValueError(f"endpoint {self.endpoint!r}: use completions or chat (--endpoint)")
        if not self.request_rate > 0:
            raise ValueError(f"request rate {self.request_rate} must be > 0 (--request-rate; inf for no pacing)")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency {self.concurrency} must be >= 1 (--concurrency)")


def make_workload(
    kind: str, n: int, vocab: int, seed: int, input_len: int = 256, output_len: int = 128, dataset: str | None = None
) -> list[Item]:
    if kind == "sharegpt":
        return sharegpt_like(n, vocab, seed=seed)
    if kind == "long-mix":
        return long_prompt_mix(n, vocab, seed=seed)
    if kind == "fixed":
        return fixed_lengths(n, vocab, input_len, output_len, seed=seed)
    if kind == "jsonl":
        if not dataset:
            raise ValueError("--workload jsonl needs --dataset PATH")
        items = from_jsonl(dataset, default_output_len=output_len)
        return [items[i % len(items)] for i in range(n)]
    raise ValueError(f"workload {kind!r} is not one of {', '.join(WORKLOADS)}")


def request_body(cfg: BenchConfig, item: Item) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": cfg.model,
        "max_tokens": item.output_len,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    if cfg.endpoint == "chat":
        if item.text is None:
            raise ValueError("the chat endpoint needs text prompts: use --endpoint completions for token ids")
        body["messages"] = [{"role": "user", "content": item.text}]
    else:
        body["prompt"] = item.text if item.text is not None else item.prompt_token_ids
    return body


def _is_token_chunk(choice: dict[str, Any], chat: bool) -> bool:
    """A chunk that carries (possibly empty) generated text; chat's role-only prelude is not one."""
    if not chat:  # llama-server ends with an empty text that only carries the finish reason: not a token
        return "text" in choice and not (choice["text"] == "" and choice.get("finish_reason"))
    delta = choice.get("delta") or {}
    if delta.get("content") is None:
        return False
    return not ("role" in delta and delta["content"] == "")


async def _read_stream(response: httpx.Response, rec: RequestRecord, chat: bool) -> None:
    done = False
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            done = True
            break
        event = json.loads(data)
        if "error" in event:
            err = event["error"]
            rec.error = f"stream_error:{err.get('code') or err.get('type') or 'unknown'}"
            return
        usage = event.get("usage")
        if usage:
            rec.output_tokens = usage.get("completion_tokens")
            rec.prompt_tokens = usage.get("prompt_tokens") or rec.prompt_tokens
        choices = event.get("choices") or []
        if choices and _is_token_chunk(choices[0], chat):
            rec.chunk_times.append(time.perf_counter())
    rec.end = time.perf_counter()
    if not done:
        rec.error = "incomplete_stream"


async def send_request(client: httpx.AsyncClient, cfg: BenchConfig, item: Item) -> RequestRecord:
    """One streamed request; never raises for a failed request (the record carries the error kind)."""
    path = "/v1/chat/completions" if cfg.endpoint == "chat" else "/v1/completions"
    rec = RequestRecord(start=time.perf_counter(), prompt_tokens=item.prompt_len)
    try:
        async with client.stream("POST", cfg.base_url.rstrip("/") + path, json=request_body(cfg, item)) as resp:
            rec.prefill_node = resp.headers.get("x-pd-prefill")
            rec.decode_node = resp.headers.get("x-pd-decode")
            if resp.status_code != 200:
                rec.error, rec.error_detail = f"http_{resp.status_code}", (await resp.aread())[:300].decode(errors="replace")
                return rec
            await _read_stream(resp, rec, cfg.endpoint == "chat")
    except httpx.TimeoutException:
        rec.error = "timeout"
    except httpx.ConnectError:
        rec.error = "connect_error"
    except httpx.HTTPError as exc:
        rec.error = type(exc).__name__
    except json.JSONDecodeError:
        rec.error = "bad_json"
    return rec


def arrival_gaps(n: int, rate: float, seed: int) -> list[float]:
    """Seconds to wait before each request: exponential gaps (Poisson process) at `rate` per second."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    return [rng.expovariate(rate) for _ in range(n)]


def make_client(cfg: BenchConfig) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else None
    return httpx.AsyncClient(
        http1=not cfg.http2,
        http2=cfg.http2,
        timeout=httpx.Timeout(cfg.timeout_s, connect=30.0),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
        headers=headers,
    )


async def _drive(client: httpx.AsyncClient, cfg: BenchConfig, items: list[Item], bar: Any) -> list[RequestRecord]:
    sem = asyncio.Semaphore(cfg.concurrency) if cfg.concurrency else None

    async def one(item: Item) -> RequestRecord:
        if sem is None:
            rec = await send_request(client, cfg, item)
        else:
            async with sem:
                rec = await send_request(client, cfg, item)
        if bar is not None:
            bar.update(1)
        return rec

    tasks = []
    for item, gap in zip(items, arrival_gaps(len(items), cfg.request_rate, cfg.seed)):
        if gap > 0:
            await asyncio.sleep(gap)
        tasks.append(asyncio.create_task(one(item)))
    return list(await asyncio.gather(*tasks))


async def run_benchmark(cfg: BenchConfig, items: list[Item], warmup_items: list[Item] | None = None) -> dict[str, Any]:
    """Warm-up, then the timed run; returns {"config", "summary", "requests"}."""
    from tqdm import tqdm

    async with make_client(cfg) as client:
        if warmup_items:  # not items[:n]: a repeated prompt would hit the prefix cache
            await asyncio.gather(*(send_request(client, cfg, it) for it in warmup_items))
        bar = tqdm(total=len(items), desc=f"rate {cfg.request_rate:g}", unit="req", disable=not cfg.progress)
        t0 = time.perf_counter()
        records = await _drive(client, cfg, items, bar)
        duration = max((r.end or r.start for r in records), default=t0) - t0
        bar.close()
    summary = summarize(records, duration, cfg.slo_ttft_ms, cfg.slo_tpot_ms)
    return {"config": asdict(cfg), "summary": summary, "requests": [_request_json(r, t0) for r in records]}


def _request_json(r: RequestRecord, t0: float) -> dict[str, Any]:
    ms = 1000.0
    out: dict[str, Any] = {"sent_ms": (r.start - t0) * ms, "prompt_tokens": r.prompt_tokens, "error": r.error}
    if r.error_detail:
        out["error_detail"] = r.error_detail
    if r.ok:
        out.update(ttft_ms=r.ttft * ms, e2e_ms=r.e2e * ms, tpot_ms=r.tpot * ms, output_tokens=r.num_output_tokens,
                   itl_ms=[round(x * ms, 3) for x in r.itls])
    if r.prefill_node or r.decode_node:
        out.update(prefill=r.prefill_node, decode=r.decode_node)
    return out


def format_summary(result: dict[str, Any], title: str = "serving benchmark") -> str:
    """The one-screen table."""
    s, c = result["summary"], result["config"]
    lines = [f"==== {title} ====",
             f"{'url':<28}{c['base_url']} ({c['endpoint']}, {'HTTP/2' if c['http2'] else 'HTTP/1.1'})",
             f"{'request rate / concurrency':<28}{c['request_rate']:g} / {c['concurrency'] or '-'}",
             f"{'requests ok / failed':<28}{s['completed']} / {s['failed']}  {s['errors'] or ''}",
             f"{'duration (s)':<28}{s['duration_s']:.2f}",
             f"{'request throughput (req/s)':<28}{s['request_throughput']:.3f}",
             f"{'output tokens/s':<28}{s['output_throughput']:.1f}",
             f"{'goodput (req/s)':<28}{s['goodput']:.3f}  (attainment {s['slo_attainment']:.0%}, "
             f"TTFT<={s['slo']['ttft_ms']} ms, TPOT<={s['slo']['tpot_ms']} ms)",
             f"{'(ms)':<16}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}"]
    for key, label in (("ttft_ms", "TTFT"), ("itl_ms", "ITL"), ("tpot_ms", "TPOT"), ("e2e_ms", "E2E"),
                       ("handoff_gap_ms", "handoff gap")):
        d = s[key]
        lines.append(f"{label:<16}" + "".join(f"{d[k]:>10.1f}" for k in ("mean", "p50", "p90", "p99")))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default="demo", help="the model name sent in requests")
    ap.add_argument("--endpoint", default="completions", choices=("completions", "chat"))
    ap.add_argument("--workload", default="sharegpt", choices=WORKLOADS)
    ap.add_argument("--dataset", default=None, help="JSONL of {prompt, output_len} (--workload jsonl)")
    ap.add_argument("--input-len", type=int, default=256, help="--workload fixed: prompt tokens")
    ap.add_argument("--output-len", type=int, default=128, help="--workload fixed (and JSONL default): output tokens")
    ap.add_argument("--vocab", type=int, default=256, help="synthetic prompt ids are drawn from 10..vocab-1 (the demo tokenizer has 438 ids)")
    ap.add_argument("--num-requests", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=2, help="requests sent first and not counted")
    ap.add_argument("--request-rate", type=float, default=math.inf, help="Poisson arrivals per second (inf: all at once)")
    ap.add_argument("--concurrency", type=int, default=None, help="most requests in flight")
    ap.add_argument("--slo-ttft-ms", type=float, default=None)
    ap.add_argument("--slo-tpot-ms", type=float, default=None)
    ap.add_argument("--http2", action="store_true", help="HTTP/2 (h2c prior knowledge on http://)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    ap.add_argument("--output", default=None, help="write the JSON results here")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    cfg = BenchConfig(base_url=a.base_url, model=a.model, endpoint=a.endpoint, request_rate=a.request_rate,
                      concurrency=a.concurrency, warmup=a.warmup, slo_ttft_ms=a.slo_ttft_ms, slo_tpot_ms=a.slo_tpot_ms,
                      http2=a.http2, timeout_s=a.timeout, seed=a.seed, ignore_eos=a.ignore_eos, progress=a.progress,
                      api_key=a.api_key)
    items = make_workload(a.workload, a.num_requests + a.warmup, a.vocab, a.seed, a.input_len, a.output_len, a.dataset)
    result = asyncio.run(run_benchmark(cfg, items[a.warmup :], items[: a.warmup]))
    result["workload"] = {"kind": a.workload, "num_requests": a.num_requests, "seed": a.seed}
    print(format_summary(result))
    if a.output:
        Path(a.output).write_text(json.dumps(result, indent=1))
    return 0 if result["summary"]["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
