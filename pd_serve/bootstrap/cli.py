"""`pd-serve bootstrap`: run the rendezvous service with Granian.

Only argparse-level imports at module scope (`pd-serve --help` loads this); FastAPI, Granian and
redis are imported in `run`. The cluster token is read here from --cluster-token-file or
$PD_SERVE_CLUSTER_TOKEN and handed to the app inside the config; it is never printed.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from functools import partial
from typing import Any

from pd_serve import cli_config
from pd_serve.bootstrap.config import TOKEN_ENV, BootstrapConfig, BootstrapConfigError, read_token
from pd_serve.logs import LogConfig, add_log_arguments, granian_log_config, setup_logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = BootstrapConfig()
    parser.add_argument("--host", default=d.host, help="address to listen on")
    parser.add_argument("--port", type=int, default=d.port, help="port to listen on")
    parser.add_argument("--store", default=d.store, help="'memory' (default) or redis://HOST:PORT/DB")
    parser.add_argument(
        "--cluster-token-file",
        default=None,
        help=f"file holding the cluster token, the bearer token every route but /health requires "
        f"(default: ${TOKEN_ENV}, else no auth)",
    )
    parser.add_argument(
        "--node-ttl", type=float, default=d.node_ttl, help="seconds a node lives after its last heartbeat"
    )
    parser.add_argument("--max-nodes", type=int, default=d.max_nodes, help="most node records kept")
    parser.add_argument("--redis-prefix", default=d.redis_prefix, help="key prefix in Redis")
    add_log_arguments(parser)
    cli_config.add_config_arguments(parser)


def config_from_args(args: argparse.Namespace) -> BootstrapConfig:
    args = cli_config.resolve(args, BootstrapConfigError)
    return BootstrapConfig(
        host=args.host,
        port=args.port,
        store=args.store,
        auth_token=read_token(args.cluster_token_file),
        node_ttl=args.node_ttl,
        max_nodes=args.max_nodes,
        redis_prefix=args.redis_prefix,
        log_level=args.log_level,
    )


def run(args: argparse.Namespace) -> int:
    try:
        args = cli_config.resolve(args, BootstrapConfigError)
        config = config_from_args(args)
        log = LogConfig("bootstrap", args.log_level, args.log_format)
        if args.print_config:
            return cli_config.print_config(args)
        check_port_free(config.host, config.port)
    except (BootstrapConfigError, ValueError) as exc:
        print(f"pd-serve bootstrap: {cli_config.explain(exc, args)}", file=sys.stderr)
        return 2
    serve(config, log)
    return 0


def check_port_free(host: str, port: int) -> None:
    """Refuse a port another process listens on: Granian binds with SO_REUSEPORT, so a second
    bootstrap would silently share the port, and with memory stores clients would see two registries."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are fine
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise BootstrapConfigError(
                f"port (--port): cannot listen on {host}:{port}: {exc.strerror}"
            ) from exc


def serve(config: BootstrapConfig, log: LogConfig) -> None:
    """Serve until SIGINT/SIGTERM; one Granian worker (the memory store is per process)."""
    from pd_serve.cluster_token import warn_if_open
    from pd_serve.granian_server import granian_server
    from pd_serve.signals import relay_granian_signals

    setup_logging(log.role, log.level, log.fmt)
    warn_if_open(logging.getLogger("pd_serve.bootstrap"), "bootstrap service", config.auth_token)
    server = granian_server("pd_serve.bootstrap.app:create_app", config.host, config.port, log.level,
                            log_dictconfig=granian_log_config())
    relay_granian_signals(server)  # Granian's own handlers could deadlock on a second signal
    server.serve(target_loader=partial(build_app, config, log), wrap_loader=False)


def build_app(config: BootstrapConfig, log: LogConfig) -> Any:
    """Runs in the Granian worker (which need not be a fork of the supervisor: it sets up its logging)."""
    from pd_serve.bootstrap.app import create_app

    setup_logging(log.role, log.level, log.fmt)
    return create_app(config)
