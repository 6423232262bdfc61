"""A local serving cluster for the benchmarks: colocated or 1P1D behind `pd-serve frontend`, CPU-pinned.

Each node is `python -m pd_serve.cli ROLE` under `taskset -c CPUS` with OMP_NUM_THREADS set to its
core count (torch sizes its thread pool from it); the API process, Granian worker and engine process
inherit both. Every child gets a session of its own and is stopped by process group (SIGTERM, then
SIGKILL after a grace period) when the `with` block ends, however it ends. Nothing here measures.

`pd-serve up` is not used because it has no CPU pinning; the role flags are the ones `up` passes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

SYSTEMS = ("colocated", "disaggregated")
LAYOUT = {  # role -> CPUs, on the 2-core VM: colocated gets both, prefill and decode one each
    "colocated": {"colocated": "0-1"},
    "disaggregated": {"prefill": "0", "decode": "1"},
}
READY_TIMEOUT_S = 300.0
GRACE_S = 10.0
# The frontend's static /health probe times out after 2x this; a busy 2-core node can take seconds.
PROBE_INTERVAL_S = "5"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_count(cpus: str) -> int:
    """'0-1' -> 2, '0,2' -> 2, '3' -> 1."""
    total = 0
    for part in cpus.split(","):
        lo, _, hi = part.partition("-")
        total += int(hi or lo) - int(lo) + 1
    return total


class Child:
    def __init__(self, name: str, argv: list[str], port: int, log_dir: Path, cpus: str | None,
                 threads: int | None = None) -> None:
        self.name, self.port, self.url = name, port, f"http://127.0.0.1:{port}"
        self.log_path = log_dir / f"{name}.log"
        threads = threads or (cpu_count(cpus) if cpus else 1)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)}
        if cpus:
            argv = ["taskset", "-c", cpus, *argv]
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env=env, start_new_session=True)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2.0) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)


class LocalCluster:
    """`with LocalCluster("disaggregated", log_dir, "tcp", []) as c: ... c.url ...`"""

    def __init__(self, system: str, log_dir: Path, transfer_backend: str, engine_args: list[str],
                 colocated_threads: int | None = None) -> None:
        if system not in SYSTEMS:
            raise ValueError(f"system {system!r} is not one of {SYSTEMS}")
        self.system, self.log_dir = system, log_dir / system
        self.transfer_backend, self.engine_args = transfer_backend, engine_args
        self.colocated_threads = colocated_threads  # None: one torch thread per pinned core
        self.children: list[Child] = []
        self.nodes: list[Child] = []
        self.url = ""

    def _spawn(self, name: str, role: str, extra: list[str], cpus: str | None = None) -> Child:
        port = free_port()
        argv = [sys.executable, "-m", "pd_serve.cli", role, "--port", str(port), *extra]
        threads = self.colocated_threads if role == "colocated" else None
        child = Child(name, argv, port, self.log_dir, cpus, threads)
        self.children.append(child)
        return child

    def __enter__(self) -> LocalCluster:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: tuple[type[BaseException] | None, BaseException | None, TracebackType | None]) -> None:
        self.stop()

    def _start(self) -> None:
        node_args = ["--host", "127.0.0.1", "--model", "demo", "--log-level", "warning", *self.engine_args]
        layout = LAYOUT[self.system]
        if self.system == "colocated":
            self.nodes = [self._spawn("colocated-0", "colocated", node_args, layout["colocated"])]
            self._wait(self.nodes)
            routing = ["--decode", self.nodes[0].url]
        else:
            boot = self._spawn("bootstrap", "bootstrap", ["--host", "127.0.0.1"])
            self._wait([boot])
            role_args = [*node_args, "--bootstrap", boot.url, "--transfer-backend", self.transfer_backend]
            self.nodes = [self._spawn(f"{role}-0", role, [*role_args, "--node-id", f"{role}-0"], layout[role])
                          for role in ("prefill", "decode")]
            self._wait(self.nodes)
            routing = ["--bootstrap", boot.url]
        front = self._spawn("frontend", "frontend", ["--host", "127.0.0.1", "--probe-interval", PROBE_INTERVAL_S,
                                                     *routing])
        self._wait([front])
        self.url = front.url
        self._wait_routable()

    def _wait(self, children: list[Child]) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        pending = list(children)
        while pending:
            for child in list(pending):
                if child.popen.poll() is not None:
                    raise RuntimeError(f"{child.name} exited with {child.popen.returncode}; see {child.log_path}")
                if child.healthy():
                    pending.remove(child)
            if pending and time.monotonic() > deadline:
                raise RuntimeError(f"{pending[0].name} not healthy in {READY_TIMEOUT_S}s; see {pending[0].log_path}")
            time.sleep(0.2)

    def _wait_routable(self) -> None:
        """The frontend's /health is 200 once it has a pair; give it the probe interval to find one."""
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/v1/models", timeout=5.0) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the frontend at {self.url} found no node in 60 s; see {self.log_dir}")

    def save_metrics(self, out_dir: Path) -> None:
        """Each node's and the frontend's /metrics text, as they are now."""
        out_dir.mkdir(parents=True, exist_ok=True)
        for child in [*self.nodes, *(c for c in self.children if c.name == "frontend")]:
            try:
                with urllib.request.urlopen(f"{child.url}/metrics", timeout=10.0) as r:
                    (out_dir / f"{self.system}-{child.name}.prom").write_bytes(r.read())
            except (urllib.error.URLError, OSError) as exc:
                print(f"could not read {child.name} /metrics: {exc}", file=sys.stderr)

    @contextlib.contextmanager
    def profiling(self, out_dir: Path, enabled: bool) -> Iterator[None]:
        """py-spy record (collapsed stacks, all subprocesses) of every node while the block runs."""
        if not enabled:
            yield
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        spies = [subprocess.Popen(["py-spy", "record", "--pid", str(n.popen.pid), "--subprocesses", "--format",
                                   "raw", "--rate", "50", "--output", str(out_dir / f"{self.system}-{n.name}.txt")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for n in self.nodes]
        try:
            yield
        finally:
            for spy in spies:
                spy.send_signal(signal.SIGINT)
            for spy in spies:
                spy.wait(60)

    def stop(self) -> None:
        for child in reversed(self.children):
            child.signal(signal.SIGTERM)
        deadline = time.monotonic() + GRACE_S
        for child in self.children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.popen.wait(max(0.0, deadline - time.monotonic()))
        for child in self.children:
            child.signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.popen.wait(5.0)
