"""Circuit breaker per node: closed -> open after N consecutive failures -> half-open after a cool-down.

In half-open exactly one request (the probe) is let through; its success closes the breaker, its
failure opens it again for another cool-down. A node the frontend cannot reach is thus tried once
per cool-down instead of failing every request. The clock is injected so tests need no sleeps.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import Enum


class BreakerState(Enum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    def __init__(self, failures: int, cooldown: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = failures
        self.cooldown = cooldown
        self._clock = clock
        self.state = BreakerState.CLOSED
        self.consecutive_failures = 0
        self._opened_at = 0.0
        self._probe_out = False

    def available(self) -> bool:
        """Whether a request may be sent now (without taking the half-open probe slot)."""
        if self.state is BreakerState.OPEN:
            return self._clock() - self._opened_at >= self.cooldown
        return not (self.state is BreakerState.HALF_OPEN and self._probe_out)

    def acquire(self) -> bool:
        """Take the right to send one request; in half-open only the first caller gets it."""
        if not self.available():
            return False
        if self.state is BreakerState.OPEN:
            self.state = BreakerState.HALF_OPEN
        if self.state is BreakerState.HALF_OPEN:
            self._probe_out = True
        return True

    def success(self) -> None:
        self.state = BreakerState.CLOSED
        self.consecutive_failures = 0
        self._probe_out = False

    def failure(self) -> None:
        self.consecutive_failures += 1
        if self.state is BreakerState.HALF_OPEN or self.consecutive_failures >= self.threshold:
            self.state = BreakerState.OPEN
            self._opened_at = self._clock()
        self._probe_out = False

    def release(self) -> None:
        """The request ended with neither verdict (cancelled by the client): free the probe slot."""
        self._probe_out = False
