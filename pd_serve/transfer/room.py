"""One room's state machine: Bootstrapping -> WaitingForInput -> Transferring -> Success | Failed.

A room is written only on the transfer engine's event loop thread; the scheduler thread reads
`visible_state`, `failure_reason` and the result fields, which are plain attribute reads. States
only move forward, Failed is final, and every non-terminal state has a deadline. A receiver room
that failed while a write into its pages is still in flight reports Transferring until that write
settles, so the engine never frees pages that may still be written.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from pd_serve.intmath import div_ceil
from pd_serve.transfer.config import RoomState, TransferConfig


@dataclass
class Destination:
    """Where a room's KV goes, as the receiver announced it."""

    page_ids: list[int]
    expected_tokens: int
    prompt_hash: str


@dataclass
class Room:
    room: int
    role: str  # "sender" | "receiver"
    config: TransferConfig
    state: RoomState = RoomState.BOOTSTRAPPING
    failure_reason: str | None = None
    peer_unreachable: bool = False  # receiver: failed because the peer's endpoint could not be reached
    deadline: float = 0.0
    conn: Any = None  # the control connection the room is bound to
    destination: Destination | None = None
    inflight_writes: int = 0  # receiver: data plane writes into destination pages in progress
    data_done: int = 0  # receiver: Data messages fully written; sender: Data messages sent
    bytes_done: int = 0
    coverage: torch.Tensor | None = None  # receiver: [num_layers, num_dst_pages] bool, pages written
    first_token: int | None = None
    first_token_logprobs: Any = None
    tail: Any = None  # sender: the asyncio task of the last queued operation, to keep order
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._arm()

    def _arm(self) -> None:
        timeout = self.config.timeout_for(self.state, self.role)
        self.deadline = time.monotonic() + timeout if timeout is not None else float("inf")

    @property
    def live(self) -> bool:
        return not self.state.terminal

    @property
    def visible_state(self) -> RoomState:
        if self.state is RoomState.FAILED and self.inflight_writes > 0:
            return RoomState.TRANSFERRING
        return self.state

    def advance(self, state: RoomState) -> None:
        """Move forward to `state` (never back, never out of a terminal state)."""
        if self.live and state > self.state:
            self.state = state
            self._arm()

    def touch(self) -> None:
        """Progress was made: restart the current state's timeout."""
        if self.live:
            self._arm()

    def fail(self, reason: str) -> bool:
        """Fail the room; returns False when it was already terminal."""
        if not self.live:
            return False
        self.failure_reason = reason
        self.state = RoomState.FAILED
        return True

    def expired(self, now: float) -> bool:
        return self.live and now > self.deadline

    def timeout_reason(self) -> str:
        seconds = self.config.timeout_for(self.state, self.role)
        if self.role == "sender" and self.state is RoomState.BOOTSTRAPPING:
            return (f"timed out after {seconds} s waiting for the decode node to admit the room "
                    "(queue_timeout, --queue-timeout)")
        flag = {
            RoomState.BOOTSTRAPPING: "bootstrap_timeout",
            RoomState.WAITING_FOR_INPUT: "waiting_timeout",
            RoomState.TRANSFERRING: "transfer_timeout",
        }[self.state]
        return (
            f"timed out after {seconds} s in {self.state.name} ({flag}, --transfer-{flag.replace('_', '-')})"
        )

    def missing_coverage(self, page_size: int) -> str | None:
        """Receiver: which (layer, page) still lacks data for the expected tokens, or None."""
        assert self.coverage is not None and self.destination is not None
        needed = div_ceil(self.destination.expected_tokens, page_size)
        missing = (~self.coverage[:, :needed]).nonzero()
        if missing.numel() == 0:
            return None
        layer, page = (int(v) for v in missing[0])
        return f"incomplete KV: {missing.shape[0]} (layer, page) pairs never arrived, first layer {layer} page index {page}"
