"""Helpers for the transfer tests: the peer process handle, small engines in this process and
waiting on rooms with deadlines."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pd_serve.transfer import KVLayout, RoomState, TransferConfig, TransferEngine

PEER = Path(__file__).with_name("transfer_peer.py")
TERMINAL = (RoomState.SUCCESS, RoomState.FAILED)
SMALL_LAYOUT = KVLayout("llama", 2, 2, 8, "float32", 4, "abc")  # the pools of local_engine


def local_engine(
    backend: str,
    token: str | None,
    wait_s: float,
    seed: int | None = None,
    connect_timeout: float | None = None,
    bootstrap_timeout: float | None = None,
) -> TransferEngine:
    """An engine for this process (not started): 2 layers of 8 pages, random from `seed` or zero;
    every timeout `wait_s` unless given."""
    gen = torch.Generator().manual_seed(seed or 0)

    def pool() -> torch.Tensor:
        return torch.randn(8, 4, 2, 8, generator=gen) if seed is not None else torch.zeros(8, 4, 2, 8)

    config = TransferConfig(
        backend=backend,
        token=token,
        bootstrap_timeout=wait_s if bootstrap_timeout is None else bootstrap_timeout,
        queue_timeout=wait_s,
        waiting_timeout=wait_s,
        transfer_timeout=wait_s,
        connect_timeout=wait_s if connect_timeout is None else connect_timeout,
    )
    return TransferEngine(config, [(pool(), pool()) for _ in range(2)], SMALL_LAYOUT)


def until(pred: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll `pred` until it holds or `timeout` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.01)
    return pred()


class ChildLines:
    """A child process's stdout lines, read by a thread so that every wait has a deadline."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, args=(proc,), daemon=True).start()

    def _pump(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self._lines.put(line.strip())

    def next(self, timeout: float) -> str | None:
        """The next line, or None when none came within `timeout` seconds."""
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            return None


class Peer:
    """The prefill-side peer process; every read has a timeout, and kill() always ends it."""

    def __init__(self, backend: str, dtype: str, seed: int, token: str | None = None) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        args = [sys.executable, str(PEER), backend, dtype, str(seed), token or "-"]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self._lines = ChildLines(self.proc)
        self.endpoint = self._read(60.0)

    def _read(self, timeout: float) -> str:
        line = self._lines.next(timeout)
        if line is None:
            raise TimeoutError(
                f"transfer peer said nothing within {timeout} s (exit code {self.proc.poll()})"
            )
        return line

    def cmd(self, **command: Any) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return json.loads(self._read(20.0))

    def expect(self, room: int, src: list[int], action: str = "send") -> None:
        self.cmd(op="expect", room=room, src=src, action=action)

    def status(self, rooms: list[int]) -> dict[int, tuple[str, str | None]]:
        return {int(k): (v[0], v[1]) for k, v in self.cmd(op="status", rooms=rooms).items()}

    def wait_status(
        self, rooms: list[int], state: str, timeout: float = 10.0
    ) -> dict[int, tuple[str, str | None]]:
        deadline = time.monotonic() + timeout
        while True:
            status = self.status(rooms)
            if all(s == state for s, _ in status.values()) or time.monotonic() > deadline:
                return status
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def wait_terminal(handles: list[Any], timeout: float = 15.0) -> list[RoomState]:
    """Poll until every handle is terminal or the deadline passes; returns the states."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(h.poll() not in TERMINAL for h in handles):
        time.sleep(0.01)
    return [h.poll() for h in handles]


def wait_state(handles: list[Any], state: RoomState, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(h.poll() >= state or h.poll() is RoomState.FAILED for h in handles):
            return True
        time.sleep(0.01)
    return False
