"""WorkerProgress drives a UCX worker from its event descriptor, never by polling.

The worker here is a fake whose descriptor is a pipe: a byte in it is an event, and `arm()` drains
it as `ucp_worker_arm` drains the worker's event fd. ucxx's own blocking mode never armed again
after the first event, so the level-triggered descriptor stayed readable and the loop progressed
the worker back to back: these tests count progress calls instead of measuring CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any

import pytest

from pd_serve.transfer.ucx_progress import UcxRequestError, WorkerProgress

SETTLE_S = 0.1  # turns of an idle loop: a spinning driver would make thousands of calls meanwhile


class FakeWorker:
    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        self.progress_calls = 0
        self.busy_arms = 0  # arm() answers "busy" this many more times
        self.blocking = False

    def init_blocking_progress_mode(self) -> None:
        self.blocking = True

    @property
    def epoll_file_descriptor(self) -> int:
        return self.read_fd

    def progress(self) -> None:
        self.progress_calls += 1

    def arm(self) -> bool:
        if self.busy_arms:
            self.busy_arms -= 1
            return False
        with contextlib.suppress(BlockingIOError):
            os.read(self.read_fd, 4096)
        return True

    def event(self) -> None:
        os.write(self.write_fd, b"x")

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)


class FakeRequest:
    def __init__(self) -> None:
        self.completed = False
        self.error: Exception | None = None

    def check_error(self) -> None:
        if self.error is not None:
            raise self.error


def _run(test: Any) -> None:
    worker = FakeWorker()
    try:
        asyncio.run(test(worker))
    finally:
        worker.close()


def test_idle_the_worker_is_progressed_only_when_its_descriptor_wakes_the_loop() -> None:
    async def body(worker: FakeWorker) -> None:
        progress = WorkerProgress(worker, asyncio.get_running_loop())
        await asyncio.sleep(SETTLE_S)
        assert worker.blocking and worker.progress_calls == 1  # once at start, then armed
        worker.event()
        await asyncio.sleep(SETTLE_S)
        assert worker.progress_calls == 2  # one event, one call: arm() drained the descriptor
        worker.busy_arms = 3
        worker.event()
        await asyncio.sleep(SETTLE_S)
        # busy arms: progressed once per turn until the arm held (plus, at most, one call for the
        # readiness the loop saw in the turn the descriptor was drained)
        assert 6 <= worker.progress_calls <= 7
        assert progress.progress_calls == worker.progress_calls
        progress.close()
        calls = worker.progress_calls
        worker.event()
        await asyncio.sleep(SETTLE_S)
        assert worker.progress_calls == calls  # closed: not watched any more

    _run(body)


def test_a_request_completes_its_future_when_the_worker_says_so() -> None:
    async def body(worker: FakeWorker) -> None:
        progress = WorkerProgress(worker, asyncio.get_running_loop())
        ok, bad, dropped = FakeRequest(), FakeRequest(), FakeRequest()
        futures = [progress.wait(r, bytearray(8)) for r in (ok, bad, dropped)]
        await asyncio.sleep(SETTLE_S)
        assert not any(f.done() for f in futures) and progress.inflight == 3
        futures[2].cancel()  # a waiter given up on (a timeout): the request stays until UCX is done
        ok.completed = bad.completed = True
        bad.error = RuntimeError("UCXCanceled")
        worker.event()
        assert await futures[0] is None
        with pytest.raises(UcxRequestError, match="UCXCanceled"):
            await futures[1]
        assert progress.inflight == 1
        dropped.completed = True
        worker.event()
        await asyncio.sleep(SETTLE_S)
        assert progress.inflight == 0
        pending = progress.wait(FakeRequest(), bytearray(8))
        progress.close()
        with pytest.raises(UcxRequestError, match="closed"):
            await pending

    _run(body)


def test_a_request_posted_after_the_last_arm_is_progressed_without_an_event() -> None:
    """wait() progresses the worker soon after the post, so a request that completes inside
    progress() without the descriptor ever becoming readable is not left waiting."""

    async def body(worker: FakeWorker) -> None:
        progress = WorkerProgress(worker, asyncio.get_running_loop())
        await asyncio.sleep(SETTLE_S)
        request = FakeRequest()
        done = progress.wait(request, bytearray(8))
        request.completed = True
        await asyncio.wait_for(done, 5.0)
        progress.close()

    _run(body)
