"""A node's three processes (Granian's supervisor, its worker, the engine the worker spawns) never
outlive the one above them, whatever stops it, and a SIGTERM at any point of the start is a clean
stop. An engine left behind would hold its GPU memory and transfer port; a worker left behind goes on
serving with nothing to stop it.

- SIGHUP the supervisor: ignored, with a warning (Granian's reload would start a second engine).
- SIGKILL the worker: the engine stops (it watches its parent), the supervisor exits 1.
- SIGKILL the supervisor: the worker aborts what is in flight and stops, and its engine with it.
- SIGTERM while the worker or the engine starts, with --drain-timeout: exit 0, nothing left (the drain
  signal used to kill a worker that had not yet installed its handler: exit 1, and an orphaned engine).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from server_helpers import NodeProcess, parent_pid, pid_alive, sse_events, wait_until

from pd_serve.bootstrap.process import ChildProcess, free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from procfs import stat_fields  # noqa: E402

GONE_TIMEOUT_S = 30.0


def _session(sid: int) -> list[int]:
    """The live processes of a session (a ChildProcess starts one): orphans keep it when reparented."""
    return [pid for pid, fields in stat_fields() if int(fields[3]) == sid and fields[0] != "Z"]


def _engine_pid(node: NodeProcess) -> int:
    pid: int = httpx.get(f"{node.url}/server_info", timeout=30).json()["engine_pid"]
    return pid


def _all_gone(node: ChildProcess) -> None:
    wait_until(lambda: not _session(node.pid), GONE_TIMEOUT_S, f"every process of the node's session ends: {_session(node.pid)}")


def test_a_killed_api_process_takes_its_engine_with_it() -> None:
    node = NodeProcess()
    try:
        engine = _engine_pid(node)
        worker = parent_pid(engine)
        assert parent_pid(worker) == node.pid
        # first a SIGHUP: Granian would reload, starting a second worker and engine beside these
        processes = sorted(_session(node.pid))
        os.kill(node.pid, signal.SIGHUP)
        wait_until(lambda: "(SIGHUP) ignored" in node.log_text(), GONE_TIMEOUT_S, "the SIGHUP warning")
        assert _engine_pid(node) == engine and parent_pid(engine) == worker
        assert sorted(_session(node.pid)) == processes
        os.kill(worker, signal.SIGKILL)
        wait_until(lambda: not pid_alive(engine), GONE_TIMEOUT_S, "the engine stops once its API process is gone")
        assert node.popen.wait(GONE_TIMEOUT_S) == 1  # Granian: an unexpected worker exit
        _all_gone(node)
        assert f"the API process (pid {worker}) is gone: stopping this engine" in node.log_text()
    finally:
        node.stop(graceful=False)


def test_a_killed_supervisor_stops_its_worker_and_engine_and_ends_the_streams() -> None:
    node = NodeProcess()
    try:
        body = {"model": "demo", "prompt": "hi", "max_tokens": 1900, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{node.url}/v1/completions", json=body, timeout=60) as stream:
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))  # generating
            os.kill(node.pid, signal.SIGKILL)
            events = sse_events(lines)
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "abort"
        _all_gone(node)
        assert f"the supervisor (pid {node.pid}) is gone" in node.log_text()
    finally:
        node.stop(graceful=False)


def _children(pid: int) -> list[int]:
    return [child for child in _session(pid) if child != pid and parent_pid(child) == pid]


@pytest.mark.parametrize("when", ["worker", "engine"])
def test_sigterm_while_the_node_starts_is_a_clean_stop(when: str) -> None:
    """`worker`: as soon as Granian has forked its worker (before the app exists); `engine`: while the
    engine process loads the model (before the node is ready)."""
    port = free_port()
    node = ChildProcess([sys.executable, "-m", "pd_serve.cli", "colocated", "--model", "demo", "--host", "127.0.0.1",
                         "--port", str(port), "--log-level", "info", "--drain-timeout", "30"],
                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        if when == "worker":
            wait_until(lambda: bool(_children(node.pid)) or node.popen.poll() is not None, 240, "Granian forks its worker",
                       interval=0.01)
        else:
            wait_until(lambda: "started: loading demo" in node.log_text() or node.popen.poll() is not None, 240,
                       "the worker starts its engine")
        os.kill(node.pid, signal.SIGTERM)
        try:
            code = node.popen.wait(60)
        except subprocess.TimeoutExpired:
            code = None
        assert code == 0, node.log_text()[-3000:]
        _all_gone(node)
    finally:
        node.stop(graceful=False)
