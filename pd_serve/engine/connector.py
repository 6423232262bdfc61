"""The engine's one seam for disaggregation: the `KVConnector` interface and its colocated form.

`EngineCore` never asks which role it has: it calls a `KVConnector` at fixed points, and everything
role-specific lives behind it (`disagg.PrefillConnector`, `disagg.DecodeConnector`; `NoConnector`
for a colocated engine). A connector holds the requests that wait on a room, outside the
scheduler; it never runs the model and never blocks on the network.

The hooks, in the order the engine calls them:
- `add(request, pd)`: from `add_request`, for a request that carries a `PDSpec` (one without goes
  straight to the scheduler). The connector holds it until its room lets it run or ends it.
- `poll()`: first thing in every `step()`, before scheduling: room states become events
  (`KVReceived`, `RoomFailed`, `KVSent`), which the engine turns into tokens or finishes.
- `take_sampled(request, token, logprobs)`: after the runner sampled, for every request that
  produced a token: True when the connector took the request over (a prefill node sends the
  pages and the first token), and the engine then emits nothing for it in this step.
- `abort(request_id, reason)`: between steps; says who ends the request (`AbortResult`).
- `num_in_flight`, `stats()`: whenever the engine reports; `close()`: once, at shutdown.
"""

from __future__ import annotations

import enum
import hashlib
import time
from abc import ABC, abstractmethod
from array import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pd_serve.engine.messages import PDSpec, TokenLogprob
from pd_serve.engine.request import Request
from pd_serve.engine.sampler import TokenLogprobs
from pd_serve.engine.scheduler import RequestRejected, Scheduler
from pd_serve.openai_errors import ErrorCode

if TYPE_CHECKING:
    import torch

    from pd_serve.config import DisaggConfig
    from pd_serve.kv_layout import KVLayout
    from pd_serve.transfer import TransferEngine

# The first token's logprobs as they travel in the transfer's completion message:
# [logprob, [[token id, logprob], ...]] (JSON on the wire, so lists).
WireLogprobs = list[Any]


def prompt_hash(token_ids: list[int]) -> str:
    return hashlib.sha256(array("q", token_ids).tobytes()).hexdigest()[:16]


def logprobs_to_wire(lp: TokenLogprobs | None) -> WireLogprobs | None:
    return None if lp is None else [lp.logprob, [list(t) for t in lp.top]]


def logprobs_from_wire(token: int, wire: WireLogprobs | None) -> list[TokenLogprob] | None:
    if not wire:
        return None
    logprob, top = wire
    return [TokenLogprob(token, float(logprob), [(int(t), float(v)) for t, v in top])]


@dataclass
class KVReceived:
    """Decode node: a room succeeded; the request's prompt KV and its first token arrived."""

    request: Request
    first_token: int
    first_token_logprobs: list[TokenLogprob] | None


@dataclass
class RoomFailed:
    """The request's room failed (or it was aborted while it had one); it ends with `reason`."""

    request: Request
    reason: str
    code: ErrorCode | None = None  # the OpenAI error code of the request's refusal, if one fits


@dataclass
class KVSent:
    """Prefill node: the room succeeded; the request is done here."""

    request: Request
    timings: dict[str, float]


Event = KVReceived | RoomFailed | KVSent


class AbortResult(enum.Enum):
    IN_SCHEDULER = "in_scheduler"  # the connector does not hold it (now): abort it in the scheduler
    ENDS_IN_POLL = "ends_in_poll"  # its room was failed; a later poll() reports it as RoomFailed
    ENDED = "ended"  # the connector dropped it before any room opened: the engine finishes it now


@dataclass
class ConnectorStats:
    """The connector's part of `EngineStats` (same field names)."""

    rooms_succeeded: int = 0
    rooms_failed: int = 0
    kv_pages_sent: int = 0
    kv_pages_received: int = 0
    kv_pages_reused: int = 0
    transfer: dict[str, int] = field(default_factory=dict)
    transfer_planes: dict[str, dict[str, int]] = field(default_factory=dict)
    transfer_peers: dict[str, str] = field(default_factory=dict)


class KVConnector(ABC):
    """See the module docstring for the order in which the engine calls these."""

    endpoint: str | None = None  # this node's transfer endpoint, for the registry
    backends: tuple[str, ...] = ()  # the transfer planes it offers, best first

    @abstractmethod
    def add(self, request: Request, pd: PDSpec) -> None:
        """Hold a disaggregated request; raises RequestRejected (nothing is held then)."""

    @abstractmethod
    def poll(self) -> list[Event]: ...

    @abstractmethod
    def take_sampled(self, request: Request, token: int, logprobs: TokenLogprobs | None) -> bool: ...

    @abstractmethod
    def abort(self, request_id: str, reason: str) -> AbortResult: ...

    @property
    @abstractmethod
    def num_in_flight(self) -> int:
        """Requests held here: waiting on or moving KV through a room."""

    @property
    def num_queued(self) -> int:
        """Of those, the ones still waiting for admission (decode: free pages; prefill: the decode node's
        receiver): a queue under load, not a transfer."""
        return 0

    @abstractmethod
    def stats(self) -> ConnectorStats: ...

    def close(self) -> None:
        return None


class NoConnector(KVConnector):
    """A colocated engine: no rooms; a request that carries `pd` is refused."""

    def add(self, request: Request, pd: PDSpec) -> None:
        raise RequestRejected("pd", "this node serves colocated requests only (no prefill/decode role)")

    def poll(self) -> list[Event]:
        return []

    def take_sampled(self, request: Request, token: int, logprobs: TokenLogprobs | None) -> bool:
        return False

    def abort(self, request_id: str, reason: str) -> AbortResult:
        return AbortResult.IN_SCHEDULER

    @property
    def num_in_flight(self) -> int:
        return 0

    def stats(self) -> ConnectorStats:
        return ConnectorStats()


@dataclass(kw_only=True)
class Room:
    """A request waiting on, or moving KV through, its room (one per role's connector)."""

    request: Request
    room: int
    aborted: str | None = None  # reason, once the request was aborted while its room was live
    pages: list[int] = field(default_factory=list)
    times: dict[str, float] = field(default_factory=lambda: {"arrived": time.monotonic()})


class RoomConnector(KVConnector):
    """What both roles share: the transfer engine, the scheduler, the room counters."""

    def __init__(self, transfer: TransferEngine, scheduler: Scheduler) -> None:
        self.transfer, self.scheduler = transfer, scheduler
        self.endpoint, self.backends = transfer.endpoint, tuple(transfer.backends)
        self.rooms_succeeded = 0
        self.rooms_failed = 0

    def close(self) -> None:
        self.transfer.close()

    def _stats(self, **pages: int) -> ConnectorStats:
        return ConnectorStats(
            rooms_succeeded=self.rooms_succeeded,
            rooms_failed=self.rooms_failed,
            transfer=self.transfer.stats(),
            transfer_planes=self.transfer.plane_stats(),
            transfer_peers=self.transfer.peers(),
            **pages,
        )


def make_connector(
    disagg: DisaggConfig | None,
    scheduler: Scheduler,
    pools: list[tuple[torch.Tensor, torch.Tensor]],
    layout: KVLayout,
    vocab_size: int,
) -> KVConnector:
    """The connector for this engine's role; starts its transfer engine when it has a role."""
    if disagg is None:
        return NoConnector()
    from pd_serve.engine.disagg import DecodeConnector, PrefillConnector
    from pd_serve.transfer import TransferEngine

    transfer: TransferEngine = TransferEngine(disagg.transfer, pools, layout).start()
    if disagg.role == "prefill":
        return PrefillConnector(transfer, scheduler)
    return DecodeConnector(transfer, scheduler, disagg.reserve_tokens, disagg.transfer.queue_timeout, vocab_size)
