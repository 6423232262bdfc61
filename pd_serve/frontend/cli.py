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
import os
import sys
from functools import partial
from typing import Any

from pd_serve import cli_config
from pd_serve.cluster_token import read_cluster_token, read_secret_file
from pd_serve.frontend.config import POLICIES, FrontendConfig, FrontendConfigError
from pd_serve.logs import LogConfig, add_log_arguments, granian_log_config, setup_logging

API_KEYS_ENV = "PD_SERVE_API_KEYS"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = FrontendConfig(decode_urls=("http://placeholder",))
    parser.add_argument("--host", default=d.host, help="address to listen on")
    _number(parser, "--port", d.port, "port to listen on")
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
    _number(parser, "--max-retries", d.max_retries, "retries on another pair, only before the client got a byte")
    _number(
        parser,
        "--local-prefill-threshold",
        d.local_prefill_threshold,
        "prompts shorter than this many characters go to a decode node alone (0: off)",
    )
    parser.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' (not on /health, /metrics); repeat for several keys "
        f"(also: --api-key-file, ${API_KEYS_ENV} comma-separated)",
    )
    parser.add_argument("--api-key-file", default=None, help="file of API keys, one per line ('#' comments)")
    parser.add_argument("--node-api-key", default=None, help="bearer token the frontend sends to nodes")
    parser.add_argument(
        "--cluster-token-file",
        default=None,
        help="file holding the cluster token, for bootstrap and sent to nodes as X-PD-Cluster-Token "
        "(default: $PD_SERVE_CLUSTER_TOKEN, else none: the internal plane is open)",
    )
    parser.add_argument(
        "--ssl-certfile", default=None, help="TLS certificate (PEM); with --ssl-keyfile: HTTPS, h2 by ALPN"
    )
    parser.add_argument("--ssl-keyfile", default=None, help="TLS private key (PEM)")
    _number(parser, "--breaker-failures", d.breaker_failures, "consecutive failures that open a node's circuit breaker")
    _number(parser, "--breaker-cooldown", d.breaker_cooldown, "seconds a breaker stays open before one probe request")
    _number(parser, "--connect-timeout", d.connect_timeout, "seconds to connect to a node")
    _number(
        parser,
        "--upstream-timeout",
        d.upstream_timeout,
        "longest silence from a node, in seconds (its headers, or between stream chunks)",
    )
    _number(
        parser,
        "--probe-interval",
        d.probe_interval,
        "seconds between node-list refreshes (bootstrap) or /health probes (static)",
    )
    _number(parser, "--prefix-chars", d.prefix_chars, "prefix_aware: leading prompt characters that make up its prefix")
    _number(
        parser,
        "--prefix-balance",
        d.prefix_balance,
        "prefix_aware: leave the prefix's node when it has this many more requests than the least loaded",
    )
    _number(parser, "--max-request-bytes", d.max_request_bytes, "largest request body (413 past it)")
    _number(
        parser,
        "--max-prompt-chars",
        d.max_prompt_chars,
        "longest prompt in characters (400 past it; nodes also limit tokens); 0: no limit",
    )
    _number(
        parser,
        "--max-output-tokens",
        d.max_output_tokens,
        "largest max_tokens / max_completion_tokens a request may ask (400 past it); 0: no limit",
    )
    _number(
        parser,
        "--max-concurrent-per-key",
        d.max_concurrent_per_key,
        "generation requests in flight per API key (429 with Retry-After past it); 0: no limit",
    )
    _number(
        parser,
        "--max-concurrent-requests",
        d.max_concurrent_requests,
        "generation requests in flight in all (503 with Retry-After past it, at once); 0: no limit",
    )
    _number(
        parser,
        "--max-queued-requests",
        d.max_queued_requests,
        "requests held in this frontend's queue while every decode node is full (503 with Retry-After "
        "past it, at once, before any work); 0: refuse at once when every decode node is full",
    )
    _number(
        parser,
        "--queue-timeout",
        d.queue_timeout,
        "seconds a request may wait in that queue before a 503",
    )
    add_log_arguments(parser)
    cli_config.add_config_arguments(parser)


def _number(parser: argparse.ArgumentParser, flag: str, default: float, help: str) -> None:
    """A numeric flag whose type is its default's (int or float)."""
    parser.add_argument(flag, type=type(default), default=default, help=help)


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
        api_keys=api_keys(args.api_key, args.api_key_file),
        node_api_key=args.node_api_key,
        cluster_token=read_cluster_token(args.cluster_token_file, FrontendConfigError),
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
        max_prompt_chars=args.max_prompt_chars,
        max_output_tokens=args.max_output_tokens,
        max_concurrent_per_key=args.max_concurrent_per_key,
        max_concurrent_requests=args.max_concurrent_requests,
        max_queued_requests=args.max_queued_requests,
        queue_timeout=args.queue_timeout,
        log_level=args.log_level,
    )


def api_keys(given: list[str], path: str | None, env: dict[str, str] | None = None) -> tuple[str, ...]:
    """Every accepted API key: --api-key values, the lines of --api-key-file, then $PD_SERVE_API_KEYS
    (comma-separated; how `pd-serve up` passes keys), without repeats."""
    keys = [k.strip() for k in given]
    if path is not None:
        lines = read_secret_file(path, "api_key_file (--api-key-file)", FrontendConfigError).splitlines()
        from_file = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
        if not from_file:
            raise FrontendConfigError(f"api_key_file (--api-key-file): {path} holds no key")
        keys += from_file
    keys += [k.strip() for k in (os.environ if env is None else env).get(API_KEYS_ENV, "").split(",") if k.strip()]
    return tuple(dict.fromkeys(keys))


def run(args: argparse.Namespace) -> int:
    from pd_serve.bootstrap.cli import check_port_free
    from pd_serve.bootstrap.config import BootstrapConfigError

    try:
        args = cli_config.resolve(args, FrontendConfigError)
        config = config_from_args(args)
        log = LogConfig("frontend", args.log_level, args.log_format)
        if args.print_config:
            return cli_config.print_config(args)
        check_port_free(config.host, config.port)
    except (FrontendConfigError, BootstrapConfigError, ValueError) as exc:
        print(f"pd-serve frontend: {cli_config.explain(exc, args)}", file=sys.stderr)
        return 2
    return serve(config, log)


def build_app(config: FrontendConfig, log: LogConfig) -> Any:
    """Runs in the Granian worker."""
    from pd_serve.frontend.app import create_app

    _logging(log)
    return create_app(config)


def _logging(log: LogConfig) -> None:
    setup_logging(log.role, log.level, log.fmt)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per upstream call otherwise


def serve(config: FrontendConfig, log: LogConfig) -> int:
    """Serve until SIGINT/SIGTERM; returns the exit code."""
    from pd_serve.granian_server import granian_server
    from pd_serve.signals import relay_granian_signals

    _logging(log)
    granian = granian_server("pd_serve.frontend.app:create_app", config.host, config.port, log.level,
                             config.ssl_certfile, config.ssl_keyfile, log_dictconfig=granian_log_config())
    relay_granian_signals(granian)  # Granian's own handlers could deadlock on a second signal
    granian.serve(target_loader=partial(build_app, config, log), wrap_loader=False)
    return 0
