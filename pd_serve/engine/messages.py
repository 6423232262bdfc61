"""Every message between API processes and the engine process, and their one codec.

Messages are plain dataclasses. `encode` turns one into bytes (orjson, with the class name as a tag);
`decode` turns bytes back into the same class. Nothing else crosses the process boundary: no
pickled objects, no method names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import orjson

from pd_serve.engine.sampling_params import SamplingParams
from pd_serve.kv_layout import KVLayout


@dataclass
class PDSpec:
    """A request's part in a disaggregated pair (the frontend's `pd` object, resolved)."""

    room: int
    peer_endpoint: str | None = None  # decode node: the prefill node's transfer endpoint


@dataclass
class AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams  # validated again on decode
    pd: PDSpec | None = None


@dataclass
class AbortRequest:
    request_id: str


@dataclass
class FlushCache:
    call_id: str = ""  # echoed in the Reply, so concurrent calls each get their own answer


@dataclass
class GetStats:
    pass  # answered with an EngineStats (the next one the engine sends)


@dataclass
class Shutdown:
    pass


@dataclass
class StartProfile:
    directory: str  # where StopProfile writes the torch profiler trace
    call_id: str = ""


@dataclass
class StopProfile:
    call_id: str = ""


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RequestDelta:
    """What one engine step produced for one request: new tokens, released text, maybe the finish."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool = False
    finish_reason: str | None = None  # stop | length | abort
    stop_reason: str | int | None = None  # the stop string or token that ended it
    error: str | None = None  # set with finish_reason "abort" when the engine refused the request
    error_param: str | None = None
    error_code: str | None = None  # the OpenAI error code of a refusal; None: engine_unavailable
    logprobs: list[TokenLogprob] | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    info: dict[str, float] | None = None  # prefill node: timings of the room (wait, prefill, transfer)


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_total_pages: int
    num_free_pages: int
    num_cached_pages: int
    page_size: int
    prefix_cache_queried_tokens: int
    prefix_cache_hit_tokens: int
    num_preemptions: int
    steps: int
    num_in_transfer: int = 0  # requests waiting on or moving KV through a room
    num_queued: int = 0  # of those, waiting for admission (decode: free pages; prefill: the decode side)
    num_requests: int = 0  # requests the engine holds in any phase (0 when idle)
    rooms_succeeded: int = 0
    rooms_failed: int = 0
    kv_pages_sent: int = 0  # prefill node
    kv_pages_received: int = 0  # decode node
    kv_pages_reused: int = 0  # decode node: prompt pages found in its own prefix cache, not transferred
    transfer: dict[str, int] = field(default_factory=dict)  # the transfer engine's counters (bytes, drops)
    # per data plane this node offers: open connections, rooms succeeded and failed on it
    transfer_planes: dict[str, dict[str, int]] = field(default_factory=dict)
    transfer_peers: dict[str, str] = field(default_factory=dict)  # "to|from PEER" -> the plane it uses
    alive: bool = True


@dataclass
class EngineReady:
    """The engine's first message once it runs: what the API process and the registry need of it."""

    layout: KVLayout
    max_model_len: int
    config: dict[str, Any]  # the EngineConfig it started with, as a dict
    model_dir: str
    role: str  # prefill | decode | colocated
    transfer_endpoint: str | None  # None when colocated
    transfer_backend: str | None  # as configured: auto, cma, ucx or tcp; None when colocated
    transfer_backends: list[str]  # the planes it offers, best first
    num_pages: int
    max_running_requests: int
    memory: dict[str, int]  # weights_bytes, kv_cache_bytes


@dataclass
class StepOutputs:
    deltas: list[RequestDelta]


@dataclass
class Reply:
    """The engine's answer to a control message (flush, profile), or its failure to start."""

    kind: str
    payload: dict[str, Any] = field(default_factory=dict)
    call_id: str = ""  # the control message's call_id; "" for a failure to start


MESSAGE_TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (AddRequest, AbortRequest, FlushCache, GetStats, Shutdown, StartProfile, StopProfile, StepOutputs,
                Reply, EngineStats, EngineReady)
}


def encode(msg: Any) -> bytes:
    return orjson.dumps({"type": type(msg).__name__, "body": dataclasses.asdict(msg)})


def decode(data: bytes) -> Any:
    raw = orjson.loads(data)
    cls = MESSAGE_TYPES[raw["type"]]
    return _build(cls, raw["body"])


def _build(cls: type, body: dict[str, Any]) -> Any:
    if cls is AddRequest:
        pd = PDSpec(**body["pd"]) if body.get("pd") else None
        return AddRequest(body["request_id"], body["prompt_token_ids"], SamplingParams(**body["sampling"]), pd)
    if cls is EngineReady:
        return EngineReady(**{**body, "layout": KVLayout.from_value(body["layout"])})
    if cls is StepOutputs:
        deltas = []
        for d in body["deltas"]:
            lps = d.pop("logprobs")
            delta = RequestDelta(**d)
            if lps is not None:
                delta.logprobs = [TokenLogprob(lp["token_id"], lp["logprob"], [tuple(t) for t in lp["top"]]) for lp in lps]
            deltas.append(delta)
        return StepOutputs(deltas)
    return cls(**body)
