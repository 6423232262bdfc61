"""`NodeState.drain`: refuse, leave, wait for the generation requests in flight (at most the timeout,
cut short by a second call), then stop the backend; the log lines count what finished and what was
aborted. The backend is a stand-in that records calls (the real one is tests/integration/test_drain.py's)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from pd_serve.config import EngineConfig
from pd_serve.server.config import ServerConfig
from pd_serve.server.state import NodeState

WAIT_S = 10.0


class Backend:
    role = "colocated"

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def leave(self) -> None:
        self.calls.append("leave")

    async def shutdown(self) -> None:
        self.calls.append("shutdown")


def _state(generations: int) -> tuple[NodeState, Backend]:
    backend = Backend()
    state = NodeState(ServerConfig(), EngineConfig(), backend)  # type: ignore[arg-type]
    state.generations = generations
    return state, backend


async def _until(check: object) -> None:
    async def poll() -> None:
        while not check():  # type: ignore[operator]
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), WAIT_S)


def test_drain_ends_once_requests_finish(caplog: pytest.LogCaptureFixture) -> None:
    async def run() -> None:
        state, backend = _state(2)
        drain = asyncio.create_task(state.drain(600))
        await _until(lambda: backend.calls == ["leave"])
        assert state.draining and state.metrics.draining._value.get() == 1
        state.generations = 0
        await asyncio.wait_for(drain, WAIT_S)
        assert backend.calls == ["leave", "shutdown"]

    with caplog.at_level(logging.INFO, "pd_serve.server.state"):
        asyncio.run(run())
    assert "drained: 2 requests finished, 0 aborted" in caplog.text


def test_drain_aborts_at_the_timeout(caplog: pytest.LogCaptureFixture) -> None:
    async def run() -> None:
        state, backend = _state(3)
        await asyncio.wait_for(state.drain(0.1), WAIT_S)
        assert backend.calls == ["leave", "shutdown"]

    with caplog.at_level(logging.INFO, "pd_serve.server.state"):
        asyncio.run(run())
    assert "drained: 0 requests finished, 3 aborted" in caplog.text


def test_second_drain_cuts_the_wait(caplog: pytest.LogCaptureFixture) -> None:
    async def run() -> None:
        state, backend = _state(1)
        first = asyncio.create_task(state.drain(600))
        await _until(lambda: backend.calls == ["leave"])
        await asyncio.wait_for(state.stop(), WAIT_S)  # the lifespan's shutdown drains again: abort now
        await asyncio.wait_for(first, WAIT_S)
        assert backend.calls == ["leave", "shutdown"]

    with caplog.at_level(logging.INFO, "pd_serve.server.state"):
        asyncio.run(run())
    assert "drained: 0 requests finished, 1 aborted" in caplog.text


def test_no_timeout_aborts_at_once(caplog: pytest.LogCaptureFixture) -> None:
    async def run() -> None:
        state, backend = _state(1)
        await asyncio.wait_for(state.drain(), WAIT_S)
        assert backend.calls == ["shutdown"] and state.draining

    with caplog.at_level(logging.INFO, "pd_serve.server.state"):
        asyncio.run(run())
    assert "draining: 1 requests in flight end with finish_reason 'abort'" in caplog.text


@pytest.mark.parametrize("drain_signal", [False, True])
def test_only_a_drained_worker_tells_its_supervisor(drain_signal: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """With --drain-timeout the worker's lifespan end sends DRAINED_SIGNAL (the supervisor's "stop") only
    after a DRAIN_SIGNAL: a worker the supervisor stops unasked (Granian's SIGHUP reload) must not,
    or the whole node stops instead of reloading."""
    import signal

    from pd_serve.server import app as app_module
    from pd_serve.server.state import DRAIN_SIGNAL, DRAINED_SIGNAL

    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(app_module.os, "kill", lambda pid, sig: sent.append((pid, sig)))  # never the real parent

    async def run() -> None:
        backend = Backend()
        state = NodeState(ServerConfig(drain_timeout=5), EngineConfig(), backend)  # type: ignore[arg-type]

        async def start() -> None:
            return None

        state.start = start  # type: ignore[method-assign]
        events: asyncio.Queue[dict[str, str]] = asyncio.Queue()
        sent_events: asyncio.Queue[str] = asyncio.Queue()

        async def send(message: dict[str, str]) -> None:
            await sent_events.put(message["type"])

        app = asyncio.create_task(app_module.create_app(state)({"type": "lifespan"}, events.get, send))
        await events.put({"type": "lifespan.startup"})
        assert await sent_events.get() == "lifespan.startup.complete"
        if drain_signal:
            signal.raise_signal(DRAIN_SIGNAL)
            await _until(lambda: "shutdown" in backend.calls)
        await events.put({"type": "lifespan.shutdown"})
        assert await sent_events.get() == "lifespan.shutdown.complete"
        await app

    asyncio.run(asyncio.wait_for(run(), WAIT_S))
    if drain_signal:
        assert sent and all(sig == DRAINED_SIGNAL for _, sig in sent)
    else:
        assert sent == []


@pytest.mark.parametrize("second_call", [False, True])
def test_a_bootstrap_that_does_not_answer_does_not_lengthen_the_drain(second_call: bool) -> None:
    """Leaving the registry gives up at the drain's deadline, and at a second drain call."""

    class Unanswered(Backend):
        async def leave(self) -> None:
            self.calls.append("leave")
            await asyncio.Event().wait()  # a bootstrap that never answers (its client times out later)

    async def run() -> None:
        backend = Unanswered()
        state = NodeState(ServerConfig(), EngineConfig(), backend)  # type: ignore[arg-type]
        state.generations = 1
        first = asyncio.create_task(state.drain(600 if second_call else 0.2))
        if second_call:
            await _until(lambda: backend.calls == ["leave"])
            await asyncio.wait_for(state.drain(), WAIT_S)
        await asyncio.wait_for(first, WAIT_S)
        assert backend.calls == ["leave", "shutdown"]

    asyncio.run(run())
