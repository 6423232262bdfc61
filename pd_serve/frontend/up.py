"""`pd-serve up`: a whole local cluster as child processes: bootstrap, N prefill, M decode, the frontend.

Every child runs `python -m pd_serve.cli ROLE` on a free loopback port, in a session of its own (so a
signal reaches its Granian worker and engine too) with its log in `--log-dir`, and dies with this
process (PR_SET_PDEATHSIG) should `up` itself be killed. `up` waits until the frontend's /health is
200, naming the child that failed (with the tail of its log) if one exits or the wait times out,
prints the URL and a curl example, and watches: SIGINT/SIGTERM, or the frontend or bootstrap exiting,
stop every child (SIGTERM to each process group, SIGKILL after `--grace` seconds); with `--restart` an
exited child is started again on its port instead. `cluster.json` in the log directory names each
child's pid, URL and argv (rewritten on every start). `--colocated`
runs one `pd-serve colocated` node behind the frontend instead (no bootstrap, no prefill nodes).

Secure by default: every child gets the same cluster token in $PD_SERVE_CLUSTER_TOKEN (never in
argv, so neither `ps` nor cluster.json shows it): the one of --cluster-token-file, else the one already
in `up`'s environment, else a fresh `secrets.token_urlsafe(32)`; `--no-cluster-token` runs the
internal plane open (each child then warns). API keys reach the frontend in $PD_SERVE_API_KEYS.
`--log-level` and `--log-format` go to every child (before the `--*-arg` extras, which may override
them); `up`'s status lines (a child's exit with its log tail, restarting, stopping) are log
records under `--log-format json`, plain text otherwise; the ready line is always plain text on stdout.

Only argparse-level imports at module scope (`pd-serve --help` loads this).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from pd_serve import cli_config
from pd_serve.config import add_engine_arguments
from pd_serve.frontend.cli import API_KEYS_ENV
from pd_serve.frontend.config import POLICIES
from pd_serve.http_common import CLUSTER_TOKEN_ENV, read_cluster_token
from pd_serve.logs import add_log_arguments, setup_logging
from pd_serve.model.source import check_model_source, default_served_name
from pd_serve.signals import SignalRelay

READY_POLL_S = 0.2
_PR_SET_PDEATHSIG = 1

log = logging.getLogger("pd_serve.up")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("cluster")
    g.add_argument(
        "--num-prefill", "--prefill", type=int, default=1, dest="num_prefill", help="prefill nodes"
    )
    g.add_argument("--num-decode", "--decode", type=int, default=1, dest="num_decode", help="decode nodes")
    g.add_argument("--colocated", action="store_true", help="one colocated node behind the frontend instead")
    g.add_argument("--host", default="127.0.0.1", help="address the frontend listens on (children: loopback)")
    g.add_argument("--port", type=int, default=8000, help="the frontend's port")
    g.add_argument("--policy", default="round_robin", choices=POLICIES, help="the frontend's pairing policy")
    g.add_argument(
        "--api-key", action="append", default=[], metavar="KEY", help="an API key of the frontend (repeat for several)"
    )
    g.add_argument("--api-key-file", default=None, help="the frontend's --api-key-file (one key per line)")
    g.add_argument(
        "--cluster-token-file",
        default=None,
        help="file holding the cluster token for every child (default: $PD_SERVE_CLUSTER_TOKEN, else a random one)",
    )
    g.add_argument(
        "--no-cluster-token",
        action="store_true",
        help="run the internal plane without a token (local debugging only; every child warns)",
    )
    g.add_argument(
        "--transfer-backend",
        default="auto",
        choices=("auto", "cma", "ucx", "tcp"),
        help="KV transfer backend of every node; auto: per peer, cma on one host, else ucx, else tcp",
    )
    g.add_argument(
        "--log-dir", default=None, help="where each child's log goes (default: a new temporary directory)"
    )
    g.add_argument(
        "--ready-timeout", type=float, default=600.0, help="seconds to wait for the cluster to be healthy"
    )
    g.add_argument(
        "--grace", type=float, default=15.0, help="seconds between SIGTERM and SIGKILL when stopping"
    )
    g.add_argument(
        "--frontend-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="an extra argument for pd-serve frontend (repeat; e.g. --frontend-arg=--max-retries=3)",
    )
    g.add_argument(
        "--node-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="an extra argument for every prefill/decode/colocated node (repeat; e.g. --node-arg=--transfer-timeout=5)",
    )
    g.add_argument(
        "--bootstrap-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="an extra argument for pd-serve bootstrap (repeat; e.g. --bootstrap-arg=--store=redis://127.0.0.1:6379/0)",
    )
    g.add_argument(
        "--served-model-name",
        default=None,
        help="the model name every node serves and clients send (default: from --model, e.g. smollm2)",
    )
    g.add_argument(
        "--restart",
        action="store_true",
        help="restart a child that exits (same port and arguments) instead of stopping the cluster",
    )
    add_log_arguments(g)
    add_engine_arguments(parser)
    parser.set_defaults(_up_parser=parser)
    cli_config.add_config_arguments(parser)


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
            nodes = [
                self._start(f"{role}-{i}", role, port, [*role_args, "--node-id", f"{role}-{i}"])
                for role, count in (("prefill", a.num_prefill), ("decode", a.num_decode))
                for i in range(count)
                for port in (free_port(),)
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


def child_env(args: argparse.Namespace, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of every child: `base` (default: ours) with the cluster token and API keys
    (see the module docstring). ValueError when --cluster-token-file cannot be read."""
    env = dict(os.environ if base is None else base)
    keys = [*args.api_key, *filter(None, env.get(API_KEYS_ENV, "").split(","))]
    if keys:
        env[API_KEYS_ENV] = ",".join(keys)
    if args.no_cluster_token:
        env.pop(CLUSTER_TOKEN_ENV, None)
        return env
    token = read_cluster_token(args.cluster_token_file, env=env) if args.cluster_token_file else None
    env[CLUSTER_TOKEN_ENV] = token or env.get(CLUSTER_TOKEN_ENV, "").strip() or secrets.token_urlsafe(32)
    return env


def run(args: argparse.Namespace) -> int:
    try:
        args = cli_config.resolve(args)
    except cli_config.ConfigFileError as exc:
        print(f"pd-serve up: {exc}", file=sys.stderr)
        return 2
    if args.num_prefill < 0 or args.num_decode < 1:
        print("pd-serve up: --num-decode must be >= 1 and --num-prefill >= 0", file=sys.stderr)
        return 2
    try:
        env = child_env(args)
    except ValueError as exc:
        print(f"pd-serve up: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        return cli_config.print_config(args)
    try:
        check_model_source(args.model)  # before any child starts: each would fail with the same message
    except ValueError as exc:
        print(f"pd-serve up: {exc}", file=sys.stderr)
        return 2
    setup_logging("up", args.log_level, args.log_format)
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="pd-serve-up-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    relay = SignalRelay("pd-serve-up-signals")  # a second signal inside the first one's stop.set() would hang
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, relay.relayed(lambda _: stop.set()))
    cluster = Cluster(args, log_dir, stop, env)
    code = 0
    try:
        url = cluster.start()
        layout = (
            "1 colocated node" if args.colocated else f"{args.num_prefill} prefill, {args.num_decode} decode"
        )
        auth = " -H \"Authorization: Bearer $YOUR_API_KEY\"" if args.api_key or args.api_key_file else ""
        served = args.served_model_name or default_served_name(args.model)
        print(
            f"pd-serve up: ready at {url} ({layout}; logs in {log_dir})\n"
            f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\\n"
            f'    -d \'{{"model": "{served}", "messages": [{{"role": "user", "content": "Hello"}}], '
            f'"max_tokens": 32}}\'',
            flush=True,
        )
        code = cluster.watch()
    except ClusterFailed as exc:
        say(args, str(exc), logging.ERROR)
        code = 1
    finally:
        say(args, "stopping", logging.INFO)
        cluster.stop(args.grace)
    return code
