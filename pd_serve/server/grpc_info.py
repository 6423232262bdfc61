"""What smg reads from a `grpc://` worker, as SGLang's scheduler messages, from this node's own values.

- `model_info`: `GetModelInfoResponse` (model and tokenizer path, context length, vocabulary, special
  token ids, architecture), the same values `/model_info` and `/server_info` answer;
- `server_info`: `GetServerInfoResponse`, with SGLang's server fields and ours as a Struct (JSON values);
- `scheduler_loads`: `GetLoadsResponse` from the engine's real stats (the numbers of `/v1/loads`);
- `tokenizer_chunks`: the model directory's tokenizer files as a zip, in chunks, with its SHA-256.
Pure functions of the node state and engine stats, but for reading the model directory's files.
"""

from __future__ import annotations

import hashlib
import io
import time
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import orjson
from google.protobuf.struct_pb2 import Struct
from google.protobuf.timestamp_pb2 import Timestamp
from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb

from pd_serve import __version__
from pd_serve.engine.messages import EngineStats
from pd_serve.server.sglang_info import sglang_model_info, sglang_server_info, worker_loads
from pd_serve.server.state import NodeState

TOKENIZER_CHUNK_BYTES = 1 << 20  # well under any --grpc-max-message-bytes
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
    "config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)


def model_info(state: NodeState) -> Any:
    info = state.info
    assert info is not None  # started
    sglang = sglang_model_info(state)
    tok = state.tokenizer.tokenizer
    eos = tok.eos_token_id
    return pb.GetModelInfoResponse(
        model_path=info.model_dir,
        tokenizer_path=info.model_dir,
        is_generation=True,
        preferred_sampling_params="",  # none (empty: what the proto calls no JSON)
        weight_version="default",
        served_model_name=state.model_name,
        max_context_length=state.max_model_len,
        vocab_size=state.limits.vocab_size,
        supports_vision=False,
        model_type=str(sglang["model_type"]),
        eos_token_ids=[int(eos)] if eos is not None else [],
        pad_token_id=_token_id(tok.pad_token_id),
        bos_token_id=_token_id(tok.bos_token_id),
        max_req_input_len=state.max_model_len - 1,
        architectures=[str(a) for a in sglang["architectures"]],
    )


def _token_id(value: int | None) -> int:
    return int(value) if value is not None else 0


def server_info(state: NodeState, stats: EngineStats) -> Any:
    args = {**state.config.public_dict(), **sglang_server_info(state, stats), "role": state.backend.role}
    answer = pb.GetServerInfoResponse(
        server_args=_struct(args),
        scheduler_info=_struct(asdict(stats)),
        active_requests=state.admission.in_flight,
        is_paused=state.draining,
        last_receive_timestamp=0.0,
        uptime_seconds=time.time() - state.started_at,
        sglang_version=__version__,
        server_type="grpc",
        start_time=Timestamp(seconds=int(state.started_at)),
        max_total_num_tokens=stats.num_total_pages * stats.page_size,
    )
    return answer


def _struct(value: dict[str, Any]) -> Struct:
    """A Struct from JSON values only (through orjson: a value JSON cannot hold fails here, loudly)."""
    struct = Struct()
    struct.update(orjson.loads(orjson.dumps(value)))
    return struct


def scheduler_loads(state: NodeState, stats: EngineStats, include: set[str]) -> Any:
    """smg asks for sections by name (core, memory, disagg, queues, all); core is always there."""
    loads = worker_loads(state, stats)
    snap = loads["loads"][0]
    load = pb.SchedulerLoad(
        dp_rank=0,
        num_running_reqs=snap["num_running_reqs"],
        num_waiting_reqs=snap["num_waiting_reqs"],
        num_total_reqs=snap["num_total_reqs"],
        num_used_tokens=snap["num_used_tokens"],
        max_total_num_tokens=snap["max_total_num_tokens"],
        token_usage=snap["token_usage"],
        cache_hit_rate=_hit_rate(stats),
        utilization=snap["token_usage"],
        max_running_requests=snap["max_running_requests"],
    )
    every = "all" in include
    if every or "memory" in include:
        memory = state.info.memory if state.info else {}
        load.memory.CopyFrom(pb.MemoryMetrics(
            weight_gb=memory.get("weights_bytes", 0) / 2**30,
            kv_cache_gb=memory.get("kv_cache_bytes", 0) / 2**30,
            token_capacity=snap["max_total_num_tokens"],
        ))
    if every or "disagg" in include:
        load.disaggregation.CopyFrom(_disaggregation(snap["disagg_mode"], stats))
    if every or "queues" in include:
        load.queues.CopyFrom(pb.QueueMetrics(waiting=stats.num_waiting))
    aggregate = pb.AggregateMetrics(
        total_running_reqs=load.num_running_reqs,
        total_waiting_reqs=load.num_waiting_reqs,
        total_reqs=load.num_total_reqs,
        avg_token_usage=load.token_usage,
        avg_utilization=load.utilization,
    )
    return pb.GetLoadsResponse(
        timestamp=loads["timestamp"], version=__version__, dp_rank_count=1, loads=[load], aggregate=aggregate
    )


def _hit_rate(stats: EngineStats) -> float:
    queried = stats.prefix_cache_queried_tokens
    return stats.prefix_cache_hit_tokens / queried if queried else 0.0


def _disaggregation(mode: str, stats: EngineStats) -> Any:
    queued, moving = stats.num_queued, max(stats.num_in_transfer - stats.num_queued, 0)
    if mode == "prefill":
        return pb.DisaggregationMetrics(mode=mode, prefill_prealloc_queue_reqs=queued, prefill_inflight_queue_reqs=moving)
    if mode == "decode":
        return pb.DisaggregationMetrics(mode=mode, decode_prealloc_queue_reqs=queued, decode_transfer_queue_reqs=moving)
    return pb.DisaggregationMetrics(mode=mode)


def tokenizer_chunks(state: NodeState) -> list[tuple[bytes, str]]:
    """Blocking (run it in a thread): the tokenizer files zipped, in chunks; the last carries the
    SHA-256 of the whole zip."""
    info = state.info
    assert info is not None
    model_dir = Path(info.model_dir)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as bundle:
        for name in _TOKENIZER_FILES:
            if (model_dir / name).is_file():
                bundle.write(model_dir / name, name)
    data = buffer.getvalue()
    pieces = [data[i:i + TOKENIZER_CHUNK_BYTES] for i in range(0, len(data), TOKENIZER_CHUNK_BYTES)] or [b""]
    digest = hashlib.sha256(data).hexdigest()
    return [(piece, digest if i == len(pieces) - 1 else "") for i, piece in enumerate(pieces)]
