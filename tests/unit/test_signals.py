"""`SignalRelay`: a signal that lands while the main thread holds the lock its callback needs (the
supervisor's hang: DRAINED_SIGNAL inside the SIGTERM handler's `Event.set`) still runs that
callback, once the lock is free, instead of deadlocking. Each case runs in a child process, so a
deadlock fails the test at its timeout instead of hanging the suite."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

HELD_LOCK = """
import os, signal, threading, time
from pd_serve.signals import SignalRelay

{make_handler}
event = threading.Event()
signal.signal(signal.SIGUSR2, handler)
with event._cond:  # what Event.set holds while a second signal lands in it
    os.kill(os.getpid(), signal.SIGUSR2)
    time.sleep(0.2)  # the handler runs on this thread, between two bytecodes, the lock held
    print("returned", event.is_set(), flush=True)
print("set", event.wait(10), flush=True)
"""


def _run(make_handler: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    code = HELD_LOCK.format(make_handler=textwrap.dedent(make_handler))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)


def test_a_relayed_handler_returns_at_once_and_its_callback_runs_once_the_lock_is_free() -> None:
    done = _run("relay = SignalRelay('test')\nhandler = relay.relayed(lambda signum: event.set())")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["returned False", "set True"]


def test_the_same_callback_called_in_the_handler_deadlocks() -> None:
    """The hazard itself, so that the test above is known to test it."""
    with pytest.raises(subprocess.TimeoutExpired):
        _run("def handler(signum, frame):\n    event.set()", timeout=5)


def test_callbacks_run_in_signal_order_with_their_signal_and_survive_a_failing_one() -> None:
    code = """
import os, signal, threading
from pd_serve.signals import SignalRelay
relay, seen, done = SignalRelay("test"), [], threading.Event()
def fail(signum):
    raise RuntimeError("boom")
signal.signal(signal.SIGUSR1, relay.relayed(seen.append))
signal.signal(signal.SIGUSR2, relay.relayed(fail))
signal.signal(signal.SIGHUP, relay.relayed(lambda signum: done.set()))
for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGUSR1, signal.SIGHUP):
    os.kill(os.getpid(), sig)
print(done.wait(10), seen == [signal.SIGUSR1, signal.SIGUSR1], flush=True)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert done.stdout.strip() == "True True", done.stdout + done.stderr
    assert "the handler of signal 12 failed" in done.stderr and "RuntimeError: boom" in done.stderr


def test_granians_supervisor_handlers_are_relayed() -> None:
    """Granian's own SIGINT/SIGTERM and SIGHUP handlers set its main loop's Event: relayed, a call made
    while that Event's lock is held returns, and the Event is set once the lock is free."""
    code = """
import time
from pd_serve.granian_server import granian_server
from pd_serve.signals import relay_granian_signals
granian = granian_server("x:app", "127.0.0.1", 0, "warning")
relay_granian_signals(granian)
event = granian.main_loop_interrupt
for handler, flag in ((granian.signal_handler_reload, "reload_signal"),
                      (granian.signal_handler_interrupt, "interrupt_signal")):
    with event._cond:
        handler(15, None)  # as the signal would call it, here with the lock held
        time.sleep(0.2)
        print(event.is_set(), end=" ")
    print(event.wait(10), getattr(granian, flag), end=" ", flush=True)
    event.clear()
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert done.stdout.split() == ["False", "True", "True"] * 2, done.stdout + done.stderr


def test_a_forked_child_does_not_relay_into_its_parent() -> None:
    """Granian forks its worker, which keeps the supervisor's handlers (and the relay's pipe) but not
    its thread: a signal to the worker must not run the supervisor's callback."""
    code = """
import os, signal, time
from pd_serve.signals import SignalRelay
relay, seen = SignalRelay("test"), []
signal.signal(signal.SIGUSR1, relay.relayed(seen.append))
child = os.fork()
if child == 0:
    os.kill(os.getpid(), signal.SIGUSR1)
    time.sleep(0.2)
    os._exit(0)
os.waitpid(child, 0)
time.sleep(0.5)
print(seen, end=" ")
os.kill(os.getpid(), signal.SIGUSR1)
time.sleep(0.5)
print(seen, flush=True)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert done.stdout.strip() == "[] [10]", done.stdout + done.stderr


def test_a_forked_child_still_on_the_relay_stops_on_sigterm() -> None:
    """The supervisor's SIGTERM to a worker it has just forked (a node stopped while it starts): the
    worker still runs the inherited handler, which must stop it as SIGTERM does by default, not
    swallow it (the worker then served on and the supervisor waited for it forever)."""
    code = """
import os, signal, sys, time
from pd_serve.signals import SignalRelay
relay = SignalRelay("test")
signal.signal(signal.SIGTERM, relay.relayed(lambda _: None))
ready, started = os.pipe()
child = os.fork()
if child == 0:
    os.write(started, b"x")  # past the fork's own signal reset (a signal before it is lost anyway)
    time.sleep(20)
    os._exit(0)
os.read(ready, 1)
os.kill(child, signal.SIGTERM)
_, status = os.waitpid(child, 0)
print(os.waitstatus_to_exitcode(status), flush=True)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == str(-15), done.stdout + done.stderr
