"""Engine throughput against transformers `generate`, on the same seeded workload, in one run.

transformers is run the way a user without a serving engine would: static batches of up to 32 in
arrival order, left-padded, `max_new_tokens` = the batch's longest request. Both count only the
output tokens each request asked for. Prints JSON with output tokens/s of each and the ratio.

    python bench/bench_engine.py                 # 256 requests, the demo model
    python bench/bench_engine.py --num-requests 64 --skip-transformers
    python bench/bench_engine.py --model smollm2 --num-requests 32 --max-total-tokens 32768
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workloads import Item, sharegpt_like  # noqa: E402

from pd_serve import LLM, SamplingParams  # noqa: E402
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
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
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
