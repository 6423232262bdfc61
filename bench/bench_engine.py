"""Engine throughput against transformers `generate`, on the same seeded workload, in one run.

transformers is run the way a user without a serving engine would: static batches of up to 32 in
arrival order, left-padded, `max_new_tokens` = the batch's longest request. Both count only the
output tokens each request asked for. Prints JSON with output tokens/s of each and the ratio.

    python bench/bench_engine.py                 # 256 requests, the demo model
    python bench/bench_engine.py --num-requests 64 --skip-transformers
    python bench/bench_engine.py --model smollm2 --num-requests 32 --max-total-tokens 32768

`--decode 1,16,64` measures decode steps alone instead: that many sequences with `--prompt-len`-token
prompts are prefilled, then `--steps` decode steps are timed; it reports ms per step (at batch 1,
the single-stream ms/token) and output tok/s. `--compare-layer-ops` alternates the runner's dense
ops between the C kernels and torch within the same run (interleaved rounds, medians), for A/B
figures on a noisy machine:

    python bench/bench_engine.py --model smollm2 --decode 1,16,64 --steps 40 --compare-layer-ops
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workloads import Item, sharegpt_like  # noqa: E402

from pd_serve import LLM, SamplingParams  # noqa: E402
from pd_serve.kernels import layer_ops  # noqa: E402
from pd_serve.model.source import resolve_model_path  # noqa: E402


def run_engine(model: str, items: list[Item], options: dict[str, object]) -> dict[str, float]:
    llm = LLM(model=model, show_progress=False, **options)
    llm.generate([[11, 12, 13]], SamplingParams(max_tokens=4))  # warm-up
    params = [SamplingParams(max_tokens=it.output_len, temperature=0.0, ignore_eos=True) for it in items]
    t0 = time.perf_counter()
    outs = llm.generate([it.prompt_token_ids for it in items], params)
    elapsed = time.perf_counter() - t0
    tokens = sum(len(o.token_ids) for o in outs)
    assert tokens == sum(it.output_len for it in items), "engine produced a wrong number of tokens"
    return {"seconds": elapsed, "output_tokens": tokens, "output_tokens_per_s": tokens / elapsed,
            "ms_per_output_token": 1000 * elapsed / tokens, "preemptions": llm.engine.stats().num_preemptions}


def run_decode(model: str, batches: list[int], args: argparse.Namespace) -> dict[str, object]:
    """Median decode-step time per batch size (and per dense-ops variant with --compare-layer-ops)."""
    total = max(batches) * (args.prompt_len + args.steps + 16)
    llm = LLM(model=model, show_progress=False, max_total_tokens=total, max_running_requests=max(batches),
              page_size=args.page_size)
    engine, runner = llm.engine, llm.engine.runner
    variants = {"default": runner.ops}
    if args.compare_layer_ops:
        variants = {"c_kernels": layer_ops.CPU_LAYER_OPS, "torch": layer_ops.TORCH_LAYER_OPS}
    rng, out = random.Random(args.seed), {}
    for b in batches:
        params = SamplingParams(max_tokens=args.steps + 8, temperature=0.0, ignore_eos=True)
        for i in range(b):
            engine.add_request(f"decode-{b}-{i}", [rng.randrange(10, 40000) for _ in range(args.prompt_len)], params)
        started: set[str] = set()
        while len(started) < b:  # prefill (chunked) until every sequence has its first token
            started.update(d.request_id for d in engine.step() if d.new_token_ids)
        times: dict[str, list[float]] = {name: [] for name in variants}
        cpu: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.steps // len(variants)):
            for name, ops in variants.items():  # interleaved: a burst of load hits every variant alike
                runner.ops = ops
                t0, c0 = time.perf_counter(), time.process_time()
                engine.step()
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
        runner.ops = variants[next(iter(variants))]
        engine.abort_all()
        while engine.has_unfinished():
            engine.step()
        out[f"batch_{b}"] = {
            name: {
                "ms_per_step": round(1000 * statistics.median(t), 2),
                "output_tokens_per_s": round(b / statistics.median(t), 1),
                # CPU time of the process: the work done, less hurt than wall time by other load
                # (a fair comparison at --threads 1; with more threads it counts OpenMP's spinning)
                "cpu_ms_per_step": round(1000 * statistics.median(cpu[name]), 2),
                "steps": len(t),
            }
            for name, t in times.items()
        }
    return out


def run_transformers(model_dir: Path, items: list[Item], batch_size: int) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    pad = 0
    t0 = time.perf_counter()
    useful = 0
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        width = max(len(it.prompt_token_ids) for it in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, it in enumerate(batch):  # left padding
            ids[row, width - len(it.prompt_token_ids) :] = torch.tensor(it.prompt_token_ids)
            mask[row, width - len(it.prompt_token_ids) :] = 1
        with torch.no_grad():
            hf.generate(ids, attention_mask=mask, max_new_tokens=max(it.output_len for it in batch),
                        do_sample=False, pad_token_id=pad)
        useful += sum(it.output_len for it in batch)
    elapsed = time.perf_counter() - t0
    return {"seconds": elapsed, "output_tokens": useful, "output_tokens_per_s": useful / elapsed,
            "ms_per_output_token": 1000 * elapsed / useful}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo", help="demo, smollm2, a .gguf file or a model directory")
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hf-batch-size", type=int, default=32)
    ap.add_argument("--max-running-requests", type=int, default=256)
    ap.add_argument("--chunked-prefill-size", type=int, default=2048)
    ap.add_argument("--page-size", type=int, default=16, help="KV page size (the engine default, 16)")
    ap.add_argument("--max-total-tokens", type=int, default=1 << 18,
                    help="engine KV capacity (smollm2 in float32: 46 KB per token; 32768 is 1.5 GB)")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--decode", default=None, help="comma-separated batch sizes: time decode steps alone")
    ap.add_argument("--prompt-len", type=int, default=250, help="--decode: prompt tokens of each sequence")
    ap.add_argument("--steps", type=int, default=40, help="--decode: timed steps per batch size")
    ap.add_argument("--compare-layer-ops", action="store_true", help="--decode: C kernels against torch, interleaved")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.decode:
        batches = [int(b) for b in args.decode.split(",")]
        result = {"model": args.model, "torch_threads": torch.get_num_threads(), "prompt_len": args.prompt_len,
                  "decode": run_decode(args.model, batches, args)}
        print(json.dumps(result, indent=2))
        return
    model_dir = resolve_model_path(args.model, "float32")  # a GGUF as the engine loads it on the CPU
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(str(model_dir)).vocab_size
    items = sharegpt_like(args.num_requests, vocab, seed=args.seed)
    options = {"max_running_requests": args.max_running_requests, "chunked_prefill_size": args.chunked_prefill_size,
               "max_total_tokens": args.max_total_tokens, "page_size": args.page_size}
    result: dict[str, object] = {
        "model": args.model,
        "num_requests": len(items),
        "prompt_tokens": sum(len(it.prompt_token_ids) for it in items),
        "requested_output_tokens": sum(it.output_len for it in items),
        "torch_threads": torch.get_num_threads(),
        "engine_options": options,
        "engine": run_engine(args.model, items, options),
    }
    if not args.skip_transformers:
        hf = run_transformers(model_dir, items, args.hf_batch_size)
        result["transformers"] = hf
        result["ratio_engine_over_transformers"] = result["engine"]["output_tokens_per_s"] / hf["output_tokens_per_s"]  # type: ignore[index]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
