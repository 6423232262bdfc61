"""`pd-serve colocated`: one engine process and the OpenAI API in front of it, served by Granian.

Processes: the `pd-serve` process is Granian's supervisor; it forks exactly one Granian worker
(the API process: FastAPI, tokenizer, metrics), whose ASGI lifespan spawns the engine process
through `EngineClient`. One worker, because each API process owns its engine: a second worker
would start a second engine. Granian serves HTTP/1.1 and HTTP/2 on the same port (h2c with prior
knowledge on plain TCP, ALPN h2 with TLS).

Shutdown: SIGINT/SIGTERM reach the supervisor, which first sends its worker `DRAIN_SIGNAL`
(SIGUSR1) and then stops it as Granian does. On the drain signal the worker refuses new requests
and tells the engine to stop; the engine aborts what is in flight, so every open request gets its
finished delta and streams end with finish_reason "abort" instead of running on while Granian
waits for them; the worker waits for the engine process to exit (killing it after a timeout),
runs its lifespan shutdown and exits, and then the supervisor exits. The engine ignores SIGINT (a
Ctrl-C in a terminal reaches the whole process group) and stops on SIGTERM.

Only argparse-level imports at module scope (`pd-serve --help` loads this); FastAPI, Granian and
the engine are imported in `run`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from functools import partial
from typing import Any

from pd_serve import cli_config
from pd_serve.config import ConfigError, EngineConfig, add_engine_arguments, engine_config_from_args
from pd_serve.logs import LogConfig, add_log_arguments, granian_log_config, setup_logging
from pd_serve.server.config import ServerConfig, ServerConfigError

ROLE = "colocated"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = ServerConfig()
    g = parser.add_argument_group("server")
    g.add_argument("--host", default=d.host, help="address to listen on")
    g.add_argument("--port", type=int, default=d.port, help="port to listen on")
    g.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every route but /health and /metrics")
    g.add_argument("--ssl-certfile", default=None, help="TLS certificate (PEM); with --ssl-keyfile: HTTPS, HTTP/2 by ALPN")
    g.add_argument("--ssl-keyfile", default=None, help="TLS private key (PEM)")
    g.add_argument("--max-request-bytes", type=int, default=d.max_request_bytes, help="largest request body")
    g.add_argument(
        "--max-queued-requests",
        type=int,
        default=d.max_queued_requests,
        help="engine requests accepted beyond --max-running-requests before answering 503",
    )
    g.add_argument("--profile-dir", default=None, help="default directory for /start_profile traces")
    g.add_argument("--served-model-name", default=None, help="the model name clients send (default: --model)")
    add_log_arguments(g)
    add_engine_arguments(parser)
    cli_config.add_config_arguments(parser)


def configs_from_args(args: argparse.Namespace) -> tuple[EngineConfig, ServerConfig]:
    args = cli_config.resolve(args, ServerConfigError)
    engine = engine_config_from_args(args).replace(show_progress=False)
    server = ServerConfig(
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
        max_request_bytes=args.max_request_bytes,
        max_queued_requests=args.max_queued_requests,
        profile_dir=args.profile_dir,
        served_model_name=args.served_model_name,
        log_level=args.log_level,
    )
    return engine, server


def run(args: argparse.Namespace) -> int:
    from pd_serve.bootstrap.cli import check_port_free
    from pd_serve.bootstrap.config import BootstrapConfigError

    try:
        args = cli_config.resolve(args, ServerConfigError)
        engine, server = configs_from_args(args)
        log = LogConfig(ROLE, args.log_level, args.log_format)
        if args.print_config:
            return cli_config.print_config(args)
        check_port_free(server.host, server.port)
    except (ConfigError, ServerConfigError, BootstrapConfigError, TypeError, ValueError) as exc:
        print(f"pd-serve {ROLE}: {cli_config.explain(exc, args)}", file=sys.stderr)
        return 2
    return serve(engine, server, log)


def build_app(engine: EngineConfig, server: ServerConfig, log: LogConfig) -> Any:
    """Runs in the Granian worker: the app and its (not yet started) colocated backend."""
    from pd_serve.server.app import create_app
    from pd_serve.server.backend import ColocatedBackend
    from pd_serve.server.state import NodeState

    setup_logging(log.role, log.level, log.fmt)
    return create_app(NodeState(server, engine, ColocatedBackend(engine)))


def serve(
    engine: EngineConfig, server: ServerConfig, log: LogConfig, target_loader: Callable[[], Any] | None = None
) -> int:
    """Serve until SIGINT/SIGTERM; returns the exit code. `target_loader` builds the app in the
    worker (default: the colocated node's); the prefill and decode roles pass their own."""
    from pd_serve.http_common import granian_server

    setup_logging(log.role, log.level, log.fmt)
    granian = granian_server("pd_serve.server.app:create_app", server.host, server.port, log.level,
                             server.ssl_certfile, server.ssl_keyfile, log_dictconfig=granian_log_config())
    _drain_before_stop(granian)
    granian.serve(target_loader=target_loader or partial(build_app, engine, server, log), wrap_loader=False)
    return 0


def _drain_before_stop(granian: Any) -> None:
    """On SIGINT/SIGTERM, first tell the worker to drain (DRAIN_SIGNAL), then stop it as Granian does.

    Granian stops a worker gracefully: it waits for open connections, and a stream may run for
    minutes. Draining first aborts those requests in the engine, so their streams end at once with
    a finish. This wraps Granian's supervisor signal handler (`signal_handler_interrupt`, installed
    by `serve()`); should a later Granian rename it, shutdown still works, only slower.
    """
    import os

    from pd_serve.server.state import DRAIN_SIGNAL

    stop = granian.signal_handler_interrupt

    def drain_then_stop(*args: Any, **kwargs: Any) -> None:
        for worker in list(getattr(granian, "wrks", [])):
            pid = getattr(getattr(worker, "inner", None), "pid", None)
            if pid is not None and worker.is_alive():
                os.kill(pid, DRAIN_SIGNAL)
        stop(*args, **kwargs)

    granian.signal_handler_interrupt = drain_then_stop
