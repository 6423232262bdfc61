"""What an SGLang router (smg) reads from a worker, in SGLang's shapes, from this node's own values.

- `sglang_server_info`: smg's `ServerInfo` fields (model_path, served_model_name, dp_size, ...),
  merged under what `/server_info` already answers. Never `model_id`: smg reads our `model` as its
  alias, and a body with both fails its parser;
- `sglang_model_info`: `/model_info` (model_type, architectures, tokenizer_path);
- `worker_loads`: smg's `WorkerLoadResponse` (`/v1/loads`), one rank with absolute token counts.
Pure functions of the node state and engine stats: no I/O but reading the model's config.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pd_serve import __version__
from pd_serve.engine.messages import EngineStats
from pd_serve.server.state import NodeState


def sglang_server_info(state: NodeState, stats: EngineStats) -> dict[str, Any]:
    """SGLang's `/server_info` fields that smg reads (its `ServerInfo`), from this node's own values."""
    info = state.info
    assert info is not None  # alive: started
    role = state.backend.role
    return {
        "model_path": info.model_dir,
        "tokenizer_path": info.model_dir,
        "served_model_name": state.model_name,
        "tp_size": 1,
        "dp_size": 1,
        "pp_size": 1,
        "disaggregation_mode": role if role in ("prefill", "decode") else "null",
        "disaggregation_bootstrap_port": (state.config.bootstrap_port or state.config.port)
        if role == "prefill"
        else None,
        "context_length": state.max_model_len,
        "max_total_tokens": stats.num_total_pages * stats.page_size,
        "max_running_requests": info.max_running_requests,
        "is_embedding": False,
        "version": __version__,
        "weight_version": "default",
    }


def sglang_model_info(state: NodeState) -> dict[str, Any]:
    info = state.info
    assert info is not None
    config = _hf_config(Path(info.model_dir))
    return {
        "model_path": info.model_dir,
        "tokenizer_path": info.model_dir,
        "is_generation": True,
        "preferred_sampling_params": None,
        "weight_version": "default",
        "has_image_understanding": False,
        "has_audio_understanding": False,
        "model_type": config.get("model_type") or "llama",
        "architectures": config.get("architectures") or [info.layout.architecture],
    }


def worker_loads(state: NodeState, s: EngineStats) -> dict[str, Any]:
    """smg's `WorkerLoadResponse` (`/v1/loads`): one rank, with absolute token counts."""
    total = s.num_total_pages * s.page_size
    used = (s.num_total_pages - s.num_free_pages) * s.page_size
    info = state.info
    role = state.backend.role
    snapshot = {
        "dp_rank": 0,
        "num_running_reqs": s.num_running,
        "num_waiting_reqs": s.num_waiting,
        "num_total_reqs": s.num_running + s.num_waiting + s.num_in_transfer,
        "num_used_tokens": used,
        "max_total_num_tokens": total,
        "token_usage": used / total if total else 0.0,
        "max_running_requests": info.max_running_requests if info else 0,
        "disagg_mode": role if role in ("prefill", "decode") else "null",
    }
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {"timestamp": stamp, "dp_rank_count": 1, "loads": [snapshot]}


def _hf_config(model_dir: Path) -> dict[str, Any]:
    """The model directory's config.json, or {} (a GGUF or the demo model may have none)."""
    try:
        value = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
