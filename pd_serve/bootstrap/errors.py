"""The client's errors and its retry policy (re-exported by `pd_serve.bootstrap.client`).

Errors carry the HTTP status (0 when the service could not be reached) and the service's detail.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass


class BootstrapError(RuntimeError):
    """The service answered with an error status (0: it could not be reached)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"bootstrap {status}: {detail}" if status else f"bootstrap unreachable: {detail}")
        self.status = status
        self.detail = detail


class NodeExpired(BootstrapError):
    """A heartbeat got 404: the node must register again."""


class NodeNotFound(BootstrapError):
    """A looked-up node is unknown or has expired."""


class Unauthorized(BootstrapError):
    """401: no token, or the wrong one (set PD_SERVE_CLUSTER_TOKEN or pass token=)."""


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff: initial, initial*multiplier, ... capped at max_backoff, `attempts` tries."""

    attempts: int = 8
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts: {self.attempts} must be at least 1")
        if not 0 < self.initial_backoff <= self.max_backoff:
            raise ValueError(
                f"initial_backoff: {self.initial_backoff} must be in (0, max_backoff={self.max_backoff}]"
            )

    def delays(self) -> Iterator[float]:
        """The pause after each failed try, forever (callers count attempts)."""
        delay = self.initial_backoff
        while True:
            yield delay
            delay = min(self.max_backoff, delay * self.multiplier)


def retryable(exc: BaseException) -> bool:
    """Worth another try: the service was unreachable or answered 5xx (507 included: nodes expire)."""
    return isinstance(exc, BootstrapError) and (exc.status == 0 or exc.status >= 500)
