"""`pd-serve frontend`: the OpenAI edge that pairs requests with prefill and decode nodes, on Granian.

Granian serves HTTP/1.1 and HTTP/2 on the same port (h2c with prior knowledge on plain TCP, ALPN h2
with TLS), as the node server does (`pd_serve/server/cli.py`). One worker: the node set, breakers and
load counts live in the worker's memory, and one asyncio process relays thousands of streams.
SIGINT/SIGTERM reach Granian's supervisor, which stops the worker; the app's lifespan then closes the
upstream pool (open upstream requests are closed with it, so nodes abort them).

Only argparse-level imports at module scope (`pd-serve --help` loads this).
"""

from __future__ import annotations

import argparse
import logging
import sys
from functools import partial
from typing import Any

from pd_serve import cli_config
from pd_serve.frontend.config import POLICIES, FrontendConfig, FrontendConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = FrontendConfig(decode_urls=("http://placeholder",))
    parser.add_argument("--host", default=d.host, help="address to listen on")
    parser.add_argument("--port", type=int, default=d.port, help="port to listen on")
    parser.add_argument("--bootstrap", default=None, help="bootstrap service URL (nodes are watched there)")
    parser.add_argument(
        "--prefill",
        nargs="+",
        action="extend",
        default=[],
        metavar="URL",
        help="static prefill node URLs (instead of --bootstrap)",
    )
    parser.add_argument(
        "--decode",
        nargs="+",
        action="extend",
        default=[],
        metavar="URL",
        help="static decode (or colocated) node URLs (instead of --bootstrap)",
    )
    parser.add_argument("--policy", default=d.policy, choices=POLICIES, help="how a node is picked")
    parser.add_argument(
        "--max-retries",
        type=int,
        default=d.max_retries,
        help="retries on another pair, only before the client got a byte",
    )
    parser.add_argument(
        "--local-prefill-threshold",
        type=int,
        default=d.local_prefill_threshold,
        help="prompts shorter than this many characters go to a decode node alone (0: off)",
    )
    parser.add_argument(
        "--api-key", default=None, help="require 'Authorization: Bearer KEY' (not on /health, /metrics)"
    )
    parser.add_argument("--node-api-key", default=None, help="bearer token the frontend sends to nodes")
    parser.add_argument(
        "--ssl-certfile", default=None, help="TLS certificate (PEM); with --ssl-keyfile: HTTPS, h2 by ALPN"
    )
    parser.add_argument("--ssl-keyfile", default=None, help="TLS private key (PEM)")
    parser.add_argument(
        "--breaker-failures",
        type=int,
        default=d.breaker_failures,
        help="consecutive failures that open a node's circuit breaker",
    )
    parser.add_argument(
        "--breaker-cooldown",
        type=float,
        default=d.breaker_cooldown,
        help="seconds a breaker stays open before one probe request",
    )
    parser.add_argument(
        "--connect-timeout", type=float, default=d.connect_timeout, help="seconds to connect to a node"
    )
    parser.add_argument(
        "--upstream-timeout",
        type=float,
        default=d.upstream_timeout,
        help="longest silence from a node, in seconds (its headers, or between stream chunks)",
    )
    parser.add_argument(
        "--probe-interval",
        type=float,
        default=d.probe_interval,
        help="seconds between node-list refreshes (bootstrap) or /health probes (static)",
    )
    parser.add_argument(
        "--prefix-chars",
        type=int,
        default=d.prefix_chars,
        help="prefix_aware: leading prompt characters that make up its prefix",
    )
    parser.add_argument(
        "--prefix-balance",
        type=float,
        default=d.prefix_balance,
        help="prefix_aware: leave the prefix's node when it has this many more requests than the least loaded",
    )
    parser.add_argument(
        "--max-request-bytes", type=int, default=d.max_request_bytes, help="largest request body"
    )
    parser.add_argument("--log-level", default=d.log_level, choices=("debug", "info", "warning", "error"))
    cli_config.add_config_arguments(parser)


def config_from_args(args: argparse.Namespace) -> FrontendConfig:
    args = cli_config.resolve(args, FrontendConfigError)
    return FrontendConfig(
        host=args.host,
        port=args.port,
        bootstrap=args.bootstrap,
        prefill_urls=tuple(args.prefill),
        decode_urls=tuple(args.decode),
        policy=args.policy,
        max_retries=args.max_retries,
        local_prefill_threshold=args.local_prefill_threshold,
        api_key=args.api_key,
        node_api_key=args.node_api_key,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
        breaker_failures=args.breaker_failures,
        breaker_cooldown=args.breaker_cooldown,
        connect_timeout=args.connect_timeout,
        upstream_timeout=args.upstream_timeout,
        probe_interval=args.probe_interval,
        prefix_chars=args.prefix_chars,
        prefix_balance=args.prefix_balance,
        max_request_bytes=args.max_request_bytes,
        log_level=args.log_level,
    )


def run(args: argparse.Namespace) -> int:
    from pd_serve.bootstrap.cli import check_port_free
    from pd_serve.bootstrap.config import BootstrapConfigError

    try:
        args = cli_config.resolve(args, FrontendConfigError)
        config = config_from_args(args)
        if args.print_config:
            return cli_config.print_config(args)
        check_port_free(config.host, config.port)
    except (FrontendConfigError, BootstrapConfigError) as exc:
        print(f"pd-serve frontend: {cli_config.explain(exc, args)}", file=sys.stderr)
        return 2
    return serve(config)


def build_app(config: FrontendConfig) -> Any:
    """Runs in the Granian worker."""
    from pd_serve.frontend.app import create_app

    _logging(config)
    return create_app(config)


def _logging(config: FrontendConfig) -> None:
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per upstream call otherwise


def serve(config: FrontendConfig) -> int:
    """Serve until SIGINT/SIGTERM; returns the exit code."""
    from pd_serve.http_common import granian_server

    _logging(config)
    granian = granian_server("pd_serve.frontend.app:create_app", config.host, config.port, config.log_level,
                             config.ssl_certfile, config.ssl_keyfile)
    granian.serve(target_loader=partial(build_app, config), wrap_loader=False)
    return 0
