"""Model runner: turns a `ScheduleOutput` into one forward pass and sampled tokens.

It owns the model and the KV pools, builds the flattened batch and the attention metadata, runs
the model, and samples at the last position of each chunk that reaches its request's end. It never
decides who runs: that is the scheduler's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from pd_serve.config import ConfigError
from pd_serve.engine.attention import AttentionMetadata, PagedAttention, plan_decode
from pd_serve.engine.kv_cache import KVCache
from pd_serve.engine.sampler import Sampler, SamplerOutput
from pd_serve.engine.scheduler import ScheduledChunk, ScheduleOutput
from pd_serve.kernels import cpu_native
from pd_serve.kernels.layer_ops import layer_ops
from pd_serve.model.llama import ForwardBatch, LlamaForCausalLM


@dataclass
class RunnerOutput:
    sampled: list[ScheduledChunk]  # the chunks that produced a token, in the order of `result.token_ids`
    result: SamplerOutput


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv: KVCache, device: torch.device, attention_backend: str = "auto") -> None:
        self.model, self.kv, self.device = model, kv, device
        # None: the CPU attention path; otherwise the kernels.ops backend to run attention with
        self.kernel_backend: str | None = None
        if attention_backend == "triton" or (attention_backend == "auto" and device.type == "cuda"):
            self.kernel_backend = "triton" if attention_backend == "triton" else "auto"
        if self.kernel_backend == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            # triton reads it when triton.language is first imported, which may already have happened
            raise ConfigError(
                "attention_backend (--attention-backend) 'triton' on CPU runs Triton's interpreter: "
                "start the process with TRITON_INTERPRET=1"
            )
        # CPU float32 decode reads the pools in place (kernels.cpu_native) unless it could not be built
        self.native_decode = (
            self.kernel_backend is None
            and cpu_native.supports(device, kv.k_pools[0].dtype, model.config.head_dim,
                                    model.config.num_heads // model.config.num_kv_heads)
        )
        self.page_size = kv.page_size
        self.sampler = Sampler(device)
        self.ops = layer_ops(device, kv.k_pools[0].dtype)  # C kernels for float32 on the CPU
        self.max_positions = model.max_positions

    def run(self, sched: ScheduleOutput) -> RunnerOutput:
        chunks = sorted(sched.chunks, key=lambda c: c.num_tokens != 1)  # decodes first (stable)
        batch, logit_rows, sampled = self._prepare(chunks)
        hidden = self.model(batch)
        logits = self.model.compute_logits(hidden[logit_rows], self.ops)
        result = self.sampler.sample(logits, [c.request for c in sampled])
        return RunnerOutput(sampled, result)

    def forward_logits(self, sched: ScheduleOutput) -> torch.Tensor:
        """Logits at every position of the scheduled chunks (for tests and scoring)."""
        chunks = sorted(sched.chunks, key=lambda c: c.num_tokens != 1)
        batch, _, _ = self._prepare(chunks)
        return self.model.compute_logits(self.model(batch), self.ops)

    def _prepare(self, chunks: list[ScheduledChunk]) -> tuple[ForwardBatch, torch.Tensor, list[ScheduledChunk]]:
        p = self.page_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logit_rows: list[int] = []
        sampled: list[ScheduledChunk] = []
        for c in chunks:
            req, start, end = c.request, c.start, c.start + c.num_tokens
            if c.num_tokens == 1:
                ids.append(req.token_at(start))
            else:
                tokens = req.all_token_ids if end > req.num_prompt_tokens else req.prompt_token_ids
                ids += tokens[start:end]
            positions += range(start, end)
            pages = req.page_ids
            slots += [pages[i // p] * p + i % p for i in range(start, end)]
            if c.samples:
                logit_rows.append(len(ids) - 1)
                sampled.append(c)
        if positions and max(positions) >= self.max_positions:  # the kernels index cos_sin with them
            raise ValueError(f"position {max(positions)} is past the model's {self.max_positions} positions")
        num_decode = sum(1 for c in chunks if c.num_tokens == 1)
        meta = self._metadata(chunks, num_decode, slots)
        attn = PagedAttention(
            self.kv.k_pools, self.kv.v_pools, meta, self.model.config.attention_scale, self.kernel_backend
        )
        dev = self.device
        batch = ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.long, device=dev),
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            attention=attn,
            ops=self.ops,
        )
        return batch, torch.tensor(logit_rows, dtype=torch.long, device=dev), sampled

    def _metadata(self, chunks: list[ScheduledChunk], num_decode: int, slots: list[int]) -> AttentionMetadata:
        dec, ext = chunks[:num_decode], chunks[num_decode:]
        starts = [0]
        for c in ext:
            starts.append(starts[-1] + c.num_tokens)
        decode_lens = [c.start + 1 for c in dec]
        return AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=self.device),
            num_decode=num_decode,
            decode_page_table=self._page_table(dec),
            decode_context_lens=self._int32(decode_lens),
            extend_page_table=self._page_table(ext),
            extend_query_start=self._int32(starts),
            extend_context_lens=self._int32([c.start + c.num_tokens for c in ext]),
            decode_plan=None if self.kernel_backend or self.native_decode else plan_decode(
                [c.request.page_ids for c in dec], decode_lens, self.page_size, self.device
            ),
        )

    def _page_table(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        width = max((len(c.request.page_ids) for c in chunks), default=0)
        rows = [c.request.page_ids + [0] * (width - len(c.request.page_ids)) for c in chunks]
        return torch.tensor(rows, dtype=torch.int32, device=self.device).reshape(len(chunks), width)

    def _int32(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32, device=self.device)
