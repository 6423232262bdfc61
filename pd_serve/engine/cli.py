"""`pd-serve generate PROMPT`: offline generation with the engine, printed to stdout."""

from __future__ import annotations

import argparse
import sys

from pd_serve import cli_config
from pd_serve.config import add_engine_arguments, engine_config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="+", help="one or more prompts")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--chat", action="store_true", help="render each prompt as a user message with the chat template")
    add_engine_arguments(parser)
    cli_config.add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        args = cli_config.resolve(args)
        config = engine_config_from_args(args)
    except ValueError as exc:
        print(f"pd-serve generate: {cli_config.explain(exc, args)}", file=sys.stderr)
        return 2
    if args.print_config:
        return cli_config.print_config(args)
    from pd_serve.engine.llm import LLM
    from pd_serve.engine.sampling_params import SamplingParams

    llm = LLM(config=config)
    prompts: list[str] | list[list[int]] = args.prompt
    if args.chat:
        # rendered as text, then encoded without more special tokens (the server's way): transformers 5's
        # tokenize=True returns a BatchEncoding, not a list of ids
        prompts = [
            llm.tokenizer.encode(
                llm.tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                  tokenize=False),
                add_special_tokens=False,
            )
            for p in args.prompt
        ]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p)
    for prompt, out in zip(args.prompt, llm.generate(prompts, params)):
        print(f"{prompt!r} -> {out.text!r} ({len(out.token_ids)} tokens, finish_reason={out.finish_reason})")
    return 0
