"""The children of `pd-serve up` (see `up.py`): each `pd-serve ROLE` child in a session of its own with
its log file, started in order and watched.

- `Cluster.start()`: bootstrap, then the prefill and decode nodes (or one colocated node), then the
  frontend, each waited for until its /health is 200; `ClusterFailed` names a child that exited or
  timed out, with the tail of its log.
- `Cluster.watch()`: until a signal, or the frontend or bootstrap exits; with --restart an exited
  child is started again on its port.
- `Cluster.stop(grace)`: SIGTERM to every process group, SIGKILL after `grace` seconds.

`cluster.json` in the log directory names each child's pid, URL and argv (never the cluster token,
which travels in the environment). Standard library only (`pd-serve --help` loads this).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from pd_serve.config import add_engine_arguments
from pd_serve.frontend.cli import API_KEYS_ENV
from pd_serve.kv_budget import split_cpus

READY_POLL_S = 0.2
_PR_SET_PDEATHSIG = 1

log = logging.getLogger("pd_serve.up")


def engine_flags(args: argparse.Namespace) -> list[str]:
    """The engine flags given on the command line (not left at their defaults), as node arguments."""
    probe = argparse.ArgumentParser(add_help=False)
    add_engine_arguments(probe)
    flags: list[str] = []
    for action in probe._actions:
        if not action.option_strings or action.dest == "model":
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        if isinstance(action, argparse._StoreFalseAction | argparse._StoreTrueAction):
            flags.append(action.option_strings[0])
        else:
            flags += [action.option_strings[0], str(value)]
    return flags


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when `up` dies, however it dies (Linux only)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Child:
    """One `pd-serve ROLE` child: its own session and a log file that outlives it."""

    def __init__(self, name: str, argv: list[str], url: str, log_dir: Path, env: dict[str, str]) -> None:
        self.name, self.argv, self.url, self.env = name, argv, url, env
        self.log_path = log_dir / f"{name}.log"
        with open(self.log_path, "ab") as log_file:  # a restarted child appends
            self.popen = subprocess.Popen(
                argv,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    def exited(self) -> int | None:
        return self.popen.poll()

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2.0) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)


class ClusterFailed(RuntimeError):
    """A child exited or did not become healthy; the message names it and ends with its log."""


class Cluster:
    def __init__(
        self, args: argparse.Namespace, log_dir: Path, stop: threading.Event, env: dict[str, str] | None = None
    ) -> None:
        self.args, self.log_dir, self.stop_event = args, log_dir, stop
        self.env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
        self.children: list[Child] = []
        self.bootstrap: Child | None = None
        self.frontend: Child | None = None

    def _start(self, name: str, role: str, port: int, extra: list[str]) -> Child:
        logs = ["--log-level", self.args.log_level, "--log-format", self.args.log_format]
        argv = [sys.executable, "-m", "pd_serve.cli", role, "--port", str(port), *logs, *extra]
        env = self.env if role == "frontend" else {k: v for k, v in self.env.items() if k != API_KEYS_ENV}
        child = Child(name, argv, f"http://127.0.0.1:{port}", self.log_dir, env)
        self.children.append(child)
        self.write_manifest()
        return child

    def write_manifest(self) -> None:
        """`cluster.json` in the log directory: each child's name, pid (its process group), URL and
        argv, rewritten on every (re)start, so tools and tests can find and signal one child."""
        children = [
            {"name": c.name, "pid": c.popen.pid, "url": c.url, "argv": c.argv, "log": str(c.log_path)}
            for c in self.children
        ]
        tmp = self.log_dir / "cluster.json.tmp"
        tmp.write_text(json.dumps({"up_pid": os.getpid(), "children": children}, indent=1))
        tmp.replace(self.log_dir / "cluster.json")

    def restart(self, child: Child) -> None:
        """Start `child` again with the same argv (so the same port), in place of the exited one."""
        fresh = Child(child.name, child.argv, child.url, self.log_dir, child.env)
        self.children[self.children.index(child)] = fresh
        if child is self.bootstrap:
            self.bootstrap = fresh
        if child is self.frontend:
            self.frontend = fresh
        self.write_manifest()

    def _cpu_shares(self, engines: int) -> list[list[str]]:
        """Per node, with `up --split-cpus`: `--cpus LIST`, the CPUs `up` may use cut into one share per
        engine, so that engines on one host do not take turns on the same cores; nothing without it,
        when the user chose (`--cpus`, or in a node argument) or when there are fewer CPUs than engines."""
        a = self.args
        extra = [*a.node_arg, *getattr(a, "prefill_arg", []), *getattr(a, "decode_arg", [])]
        chosen = getattr(a, "cpus", None) is not None or any(x.startswith("--cpus") for x in extra)
        if not getattr(a, "split_cpus", False) or chosen:
            return [[] for _ in range(engines)]
        shares = split_cpus(sorted(os.sched_getaffinity(0)), [1] * engines)
        return [["--cpus", s] for s in shares] if shares else [[] for _ in range(engines)]

    def start(self) -> str:
        """Start every child and wait until the frontend is healthy; returns the frontend URL."""
        a = self.args
        served = ["--served-model-name", a.served_model_name] if a.served_model_name else []
        node_args = ["--host", "127.0.0.1", "--model", a.model, *served, *engine_flags(a), *a.node_arg]
        if a.colocated:
            node = self._start("colocated-0", "colocated", free_port(), node_args)
            self._wait([node])
            nodes_flag = ["--decode", node.url]
        else:
            self.bootstrap = self._start(
                "bootstrap", "bootstrap", free_port(), ["--host", "127.0.0.1", *a.bootstrap_arg]
            )
            self._wait([self.bootstrap])
            role_args = [*node_args, "--bootstrap", self.bootstrap.url]
            if a.transfer_backend:
                role_args += ["--transfer-backend", a.transfer_backend]
            names = [(role, i) for role, count in (("prefill", a.num_prefill), ("decode", a.num_decode))
                     for i in range(count)]  # fmt: skip
            cpus = self._cpu_shares(len(names))
            nodes = [
                self._start(f"{role}-{i}", role, free_port(),
                            [*role_args, *cpus[k], *getattr(a, f"{role}_arg", []), "--node-id", f"{role}-{i}"])
                for k, (role, i) in enumerate(names)
            ]
            self._wait(nodes)
            nodes_flag = ["--bootstrap", self.bootstrap.url]
        front = ["--host", a.host, "--policy", a.policy, *nodes_flag, *a.frontend_arg]
        if a.api_key_file:
            front += ["--api-key-file", a.api_key_file]
        self.frontend = self._start("frontend", "frontend", a.port, front)
        self.frontend.url = f"http://{'127.0.0.1' if a.host in ('0.0.0.0', '::') else a.host}:{a.port}"
        self._wait([self.frontend])
        return self.frontend.url

    def _wait(self, children: list[Child]) -> None:
        deadline = time.monotonic() + self.args.ready_timeout
        pending = list(children)
        while pending:
            for child in list(pending):
                code = child.exited()
                if code is not None:
                    raise ClusterFailed(
                        f"{child.name} exited with {code} while starting; log {child.log_path}:\n"
                        f"{child.log_tail()}"
                    )
                if child.healthy():
                    pending.remove(child)
            if self.stop_event.is_set():
                raise ClusterFailed("stopped by a signal while starting")
            if pending and time.monotonic() > deadline:
                child = pending[0]
                raise ClusterFailed(
                    f"{child.name} not healthy within {self.args.ready_timeout}s "
                    f"(--ready-timeout); log {child.log_path}:\n{child.log_tail()}"
                )
            if pending:
                self.stop_event.wait(READY_POLL_S)

    def watch(self) -> int:
        """Until a signal (0), or the frontend or bootstrap exits (1); a node exiting is reported
        (and, with --restart, any exited child is started again instead)."""
        reported: set[Child] = set()
        while not self.stop_event.wait(0.5):
            for child in list(self.children):
                code = child.exited()
                if code is None or child in reported:
                    continue
                reported.add(child)
                say(
                    self.args,
                    f"{child.name} exited with {code}; log {child.log_path}:\n{child.log_tail(1500)}",
                    logging.ERROR,
                )
                if self.args.restart:
                    child.signal(signal.SIGKILL)  # what is left of its process group
                    say(self.args, f"restarting {child.name}", logging.WARNING)
                    self.restart(child)
                elif child in (self.frontend, self.bootstrap):
                    return 1
        return 0

    def stop(self, grace: float) -> None:
        """SIGTERM every child (frontend first), then SIGKILL whatever is left after `grace` seconds."""
        for child in reversed(self.children):
            child.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for child in self.children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.popen.wait(max(0.0, deadline - time.monotonic()))
        for child in self.children:  # the leader's leftovers (Granian workers, engines) too
            child.signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.popen.wait(5.0)


def say(args: argparse.Namespace, message: str, level: int) -> None:
    """A status line of `up` itself: plain on stderr, or a log record with --log-format json."""
    if args.log_format == "json":
        log.log(level, message)
    else:
        print(f"pd-serve up: {message}", file=sys.stderr, flush=True)


