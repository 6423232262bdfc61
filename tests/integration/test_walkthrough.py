"""docs/walkthrough.md, run as written: its four `# terminal N` blocks, in order, on free loopback ports.

Terminals 1-3 are long-running (bootstrap, prefill, decode), each a `bash -c BLOCK` in a session of its
own; terminal 4 starts the frontend in the background, waits for it, and asks for a chat completion,
whose JSON is the last line it prints. `pd-serve` resolves to this checkout's interpreter through a
shim first on PATH. Teardown stops every session and checks that no process of the four survives.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from server_helpers import pid_alive

from pd_serve.bootstrap.process import ChildProcess, free_port

DOC = Path(__file__).resolve().parents[2] / "docs" / "walkthrough.md"
TERMINAL_4_TIMEOUT_S = 150.0
STOP_GRACE_S = 5.0
BLOCK = re.compile(r"```bash\n(# terminal (\d)[^\n]*\n.*?)```", re.S)


def terminal_blocks() -> dict[int, str]:
    return {int(n): body for body, n in BLOCK.findall(DOC.read_text())}


def test_the_doc_has_four_terminals() -> None:
    blocks = terminal_blocks()
    assert sorted(blocks) == [1, 2, 3, 4]
    for n, role in ((1, "bootstrap"), (2, "prefill"), (3, "decode"), (4, "frontend")):
        assert f"pd-serve {role} " in blocks[n]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    shim = tmp_path / "bin" / "pd-serve"
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m pd_serve.cli "$@"\n')
    shim.chmod(0o755)
    ports = {name: str(free_port()) for name in ("BOOTSTRAP_PORT", "PREFILL_PORT", "DECODE_PORT", "FRONTEND_PORT")}
    return {**os.environ, **ports, "PATH": f"{shim.parent}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}


def session_members(sid: int) -> list[int]:
    """Every live process of session `sid` (a terminal's shell, and what it started, orphans too)."""
    members = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[3]) == sid:
                members.append(int(entry.name))
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
    return members


@pytest.fixture
def terminals() -> Iterator[list[ChildProcess]]:
    """The terminals' sessions: SIGTERM to all at once, SIGKILL after STOP_GRACE_S, none may survive."""
    started: list[ChildProcess] = []
    try:
        yield started
    finally:
        pids = {pid for child in started for pid in session_members(child.pid)}
        for child in started:
            child._signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        for child in started:
            child.stop(graceful=False)
        left = [p for p in pids if pid_alive(p)]
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert not left, f"processes left after SIGKILL: {left}"


def test_four_terminals_serve_a_chat_completion(env: dict[str, str], terminals: list[ChildProcess]) -> None:
    """Teardown (the `terminals` fixture) stops all four, the frontend of terminal 4 included."""
    blocks = terminal_blocks()
    for n in (1, 2, 3):
        terminals.append(ChildProcess(["bash", "-c", blocks[n]], env=env))
    shell = ChildProcess(["bash", "-c", blocks[4]], env=env)
    terminals.append(shell)
    deadline = time.monotonic() + TERMINAL_4_TIMEOUT_S
    while shell.popen.poll() is None and time.monotonic() < deadline:
        for child in terminals[:3]:
            assert child.popen.poll() is None, f"{child.argv[-1][:40]} exited:\n{child.log_text()[-3000:]}"
        time.sleep(0.2)
    log = shell.log_text()
    assert shell.popen.returncode == 0, f"terminal 4 did not finish in {TERMINAL_4_TIMEOUT_S}s:\n{log[-3000:]}"
    answer = json.loads(log.strip().splitlines()[-1])
    assert answer["object"] == "chat.completion", answer
    assert answer["choices"][0]["message"]["role"] == "assistant"
    assert "Paris" in answer["choices"][0]["message"]["content"], answer  # the trained model, greedy
    assert answer["usage"]["completion_tokens"] > 0
    assert session_members(shell.pid), "terminal 4's frontend should outlive its shell until teardown"
    assert len(session_members(terminals[1].pid)) >= 3, "prefill: Granian supervisor, worker, engine"
