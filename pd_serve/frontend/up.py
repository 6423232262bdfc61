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
The children and their lifecycle are `cluster.py`'s; this module is the command: flags, environment,
the ready line.

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
import logging
import os
import secrets
import signal
import sys
import tempfile
import threading
from pathlib import Path

from pd_serve import cli_config
from pd_serve.cluster_token import CLUSTER_TOKEN_ENV, read_cluster_token
from pd_serve.config import add_engine_arguments
from pd_serve.frontend.cli import API_KEYS_ENV
from pd_serve.frontend.cluster import Cluster, ClusterFailed, say
from pd_serve.frontend.config import POLICIES
from pd_serve.logs import add_log_arguments, setup_logging
from pd_serve.model.source import check_model_source, default_served_name
from pd_serve.signals import SignalRelay


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
        "--split-cpus", action="store_true",
        help="give each engine its own share of the CPUs (--cpus) instead of all of them; on 2 cores 1P1D: "
        "more throughput under load, slower single streams (bench/README.md, overload)",
    )
    for role in ("prefill", "decode"):
        g.add_argument(
            f"--{role}-arg", action="append", default=[], metavar="ARG",
            help=f"an extra argument for every {role} node only, after --node-arg (e.g. --{role}-arg=--kv-cache-memory=1GiB)",
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
