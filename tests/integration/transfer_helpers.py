"""Helpers for the transfer tests: the peer process handle and waiting on rooms with deadlines."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pd_serve.transfer import RoomState

PEER = Path(__file__).with_name("transfer_peer.py")
TERMINAL = (RoomState.SUCCESS, RoomState.FAILED)


class Peer:
    """The prefill-side peer process; every read has a timeout, and kill() always ends it."""

    def __init__(self, backend: str, dtype: str, seed: int, token: str | None = None) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        args = [sys.executable, str(PEER), backend, dtype, str(seed), token or "-"]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.endpoint = self._read(60.0)

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.strip())

    def _read(self, timeout: float) -> str:
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(
                f"transfer peer said nothing within {timeout} s (exit code {self.proc.poll()})"
            ) from None

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
