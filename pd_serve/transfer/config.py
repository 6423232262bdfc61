"""Transfer configuration, the KV layout fingerprint and the room states.

Everything here is a value: frozen, validated on construction, never mutated. It must never
import the engine; the engine hands the transfer layer tensors, page ids and these values.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

PLANES = ("cma", "ucx", "tcp")  # the data planes, in the order `auto` prefers them
BACKENDS = ("auto", *PLANES)  # what --transfer-backend takes: auto, or one plane forced


class TransferConfigError(ValueError):
    """A transfer setting is invalid; the message names the field and its flag."""


def _require(cond: bool, name: str, message: str) -> None:
    if not cond:
        raise TransferConfigError(f"{name} (--transfer-{name.replace('_', '-')}): {message}")


def default_backend() -> str:
    """`auto`: per peer, the fastest plane both ends can use (handshake.py)."""
    return "auto"


@dataclass(frozen=True)
class TransferConfig:
    """One node's transfer engine settings. Timeouts are seconds, per room state."""

    # auto (per peer: cma on one host, else ucx, else tcp) | cma (same-host process_vm_readv) | ucx | tcp
    backend: str = "auto"
    host: str = "127.0.0.1"  # address to bind and to publish in the endpoint
    port: int = 0  # 0: any free port
    bootstrap_timeout: float = 30.0  # Bootstrapping: until both sides know the room
    # a sender's Bootstrapping: until the decode node admits the room (reserves its pages); a queue
    # wait under load, not a stall, so it has its own, generous bound (also the decode node's page wait)
    queue_timeout: float = 300.0
    waiting_timeout: float = 300.0  # WaitingForInput: until the first KV arrives / is sent
    transfer_timeout: float = 30.0  # Transferring: longest time without progress
    connect_timeout: float = 5.0  # opening the control connection to a peer
    # the cluster token: both ends of a connection prove they hold it (never sent, never logged)
    token: str | None = field(default=None, repr=False)
    min_run_bytes: int = 256 * 1024  # average contiguous run below this: gather into one message
    chunk_bytes: int = 8 * 1024 * 1024  # largest single socket read/write or UCX message
    ucx_error_handling: bool = True  # False: UCX may use cma (fast) but a peer crash aborts us
    finished_rooms_kept: int = 65536  # finished room ids remembered to refuse reuse

    def __post_init__(self) -> None:
        _require(self.backend in BACKENDS, "backend", f"{self.backend!r} is not one of {', '.join(BACKENDS)}")
        _require(bool(self.host), "host", "must not be empty")
        _require(0 <= self.port <= 65535, "port", f"{self.port} is outside 0..65535")
        for name in ("bootstrap_timeout", "queue_timeout", "waiting_timeout", "transfer_timeout", "connect_timeout"):
            _require(getattr(self, name) > 0, name, f"{getattr(self, name)} must be positive")
        _require(self.token is None or len(self.token) > 0, "token", "must be None or non-empty")
        _require(self.min_run_bytes >= 0, "min_run_bytes", "must be >= 0")
        _require(self.chunk_bytes >= 4096, "chunk_bytes", f"{self.chunk_bytes} is below 4096")
        _require(self.finished_rooms_kept >= 1, "finished_rooms_kept", "must be >= 1")

    def timeout_for(self, state: RoomState, role: str = "receiver") -> float | None:
        if role == "sender" and state is RoomState.BOOTSTRAPPING:
            return self.queue_timeout
        return {
            RoomState.BOOTSTRAPPING: self.bootstrap_timeout,
            RoomState.WAITING_FOR_INPUT: self.waiting_timeout,
            RoomState.TRANSFERRING: self.transfer_timeout,
        }.get(state)


class RoomState(enum.IntEnum):
    """Room states, in order; a room only moves forward, and FAILED is final."""

    FAILED = 0
    BOOTSTRAPPING = 1
    WAITING_FOR_INPUT = 2
    TRANSFERRING = 3
    SUCCESS = 4

    def __str__(self) -> str:
        return self.name

    @property
    def terminal(self) -> bool:
        return self in (RoomState.FAILED, RoomState.SUCCESS)

