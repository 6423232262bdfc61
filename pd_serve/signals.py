"""Signal handlers that cannot deadlock the process that receives the signals.

Python runs a signal handler on the main thread between two bytecodes, including inside another
handler and inside `threading.Event.set()` while it holds the event's lock. A handler that itself
takes that lock (`Event.set`, `Thread.start`, a `Timer`, logging) then waits forever for its own
thread. This hung a node's supervisor at the end of a drain: the worker's DRAINED_SIGNAL arrived
while the handler of the second SIGTERM was inside `Event.set`. So `SignalRelay`'s handlers only
write two bytes (which callback, which signal) to a non-blocking pipe. A daemon thread reads the
pipe and runs the real callbacks, one at a time, in the order the signals came. No signal handler
runs on that thread, so the callbacks may take any lock.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

Callback = Callable[[int], Any]  # called with the signal number
Handler = Callable[[int, FrameType | None], None]  # what signal.signal takes


class SignalRelay:
    """`relayed(callback)` gives a handler for `signal.signal` (or for a library that installs its
    own) that runs `callback(signum)` on the relay's thread. At most 256 callbacks per relay."""

    def __init__(self, name: str) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._callbacks: list[Callback] = []
        self._owner = os.getpid()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def relayed(self, callback: Callback) -> Handler:
        if len(self._callbacks) == 256:
            raise ValueError("a SignalRelay relays at most 256 callbacks")
        index = len(self._callbacks)
        self._callbacks.append(callback)

        def handler(signum: int = 0, frame: FrameType | None = None) -> None:
            if os.getpid() != self._owner:  # a forked child (Granian's worker) keeps the handler, not the thread,
                _as_by_default(signum)  # and its byte would reach this process's callbacks
                return
            with contextlib.suppress(OSError):  # a full pipe (thousands unread) already wakes the thread
                os.write(self._write, bytes([index, signum & 0xFF]))  # atomic: under PIPE_BUF

        return handler

    def _run(self) -> None:
        while True:
            data = os.read(self._read, 512)  # whole pairs: each write is one atomic pair
            for index, signum in zip(data[::2], data[1::2]):
                try:
                    self._callbacks[index](signum)
                except Exception:  # one callback's failure must not stop the relay
                    log.exception("the handler of signal %d failed", signum)


def _as_by_default(signum: int) -> None:
    """In a forked child that still runs its parent's handler: SIGINT and SIGTERM stop it, as they
    would have without the handler. Granian's supervisor stops a worker it has just forked with
    SIGTERM; swallowed before the worker installs its own handlers, the worker started its engine
    and served on while the supervisor waited for it forever."""
    if signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def relay_granian_signals(
    granian: Any, interrupt: Callback | None = None, reload: Callback | None = None
) -> SignalRelay:
    """Route Granian's supervisor handlers through a relay; call it before `serve()`, which installs
    them. Both set a `threading.Event`: `signal_handler_interrupt` (SIGINT/SIGTERM) and
    `signal_handler_reload` (SIGHUP). `interrupt` and `reload`, when given, replace what those
    signals do. Returns the relay, for the caller's own signals."""
    relay = SignalRelay("granian-signals")
    stop, respawn = granian.signal_handler_interrupt, granian.signal_handler_reload
    granian.signal_handler_interrupt = relay.relayed(interrupt or (lambda _: stop()))
    granian.signal_handler_reload = relay.relayed(reload or (lambda _: respawn()))
    return relay
