"""`pd-serve colocated`: one engine process and the OpenAI API in front of it, served by Granian.

Processes: the `pd-serve` process is Granian's supervisor; it forks exactly one Granian worker
(the API process: FastAPI, tokenizer, metrics), whose ASGI lifespan spawns the engine process
through `EngineClient`. One worker, because each API process owns its engine: a second worker
would start a second engine. Granian serves HTTP/1.1 and HTTP/2 on the same port (h2c with prior
knowledge on plain TCP, ALPN h2 with TLS).

Shutdown: SIGINT/SIGTERM reach the supervisor, which first sends its worker `DRAIN_SIGNAL`
(SIGUSR1). On it the worker refuses new generation requests (503 with Retry-After, code
"draining") and answers /health with 503. With `--drain-timeout 0` (the default) the supervisor then
stops the worker at once as Granian does: the worker tells the engine to stop, the engine aborts what
is in flight, so every open request gets its finished delta and streams end with finish_reason
"abort" instead of running on while Granian waits for them. With `--drain-timeout N` the worker
leaves the bootstrap registry (prefill/decode) and lets the requests in flight finish for at most N
seconds (streams, whole answers, a prefill node's rooms), aborts what is left as above, and then
tells the supervisor (`DRAINED_SIGNAL`, SIGUSR2), which only now stops it as Granian does; a second
SIGINT/SIGTERM cuts the drain short (abort at once). Granian's own stop closes the listener, waits for
open connections (its workers_kill_timeout is unset: it never kills the worker) and runs the lifespan
shutdown: the worker waits for the engine process to exit (killing it after a timeout) and exits,
and then the supervisor exits with 0. The engine ignores SIGINT (a Ctrl-C in a terminal reaches the
whole process group) and stops on SIGTERM, so a drain needs the signal sent to the supervisor alone
(as Kubernetes and systemd's KillMode=mixed do), not to the process group.

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
DRAIN_SLACK_S = 30.0  # past --drain-timeout: the worker's own abort and engine stop, before stopping it anyway


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
    g.add_argument(
        "--served-model-name",
        default=None,
        help="the model name clients send and /v1/models lists (default: smollm2, demo, a GGUF's file stem "
        "or the model directory's name)",
    )
    g.add_argument(
        "--drain-timeout",
        type=float,
        default=d.drain_timeout,
        help="on SIGTERM/SIGINT: seconds in-flight requests may run on while new ones get 503, before the "
        "rest is aborted (a second signal aborts at once); 0: abort at once",
    )
    g.add_argument(
        "--grpc-port",
        type=int,
        default=None,
        help="also serve SGLang's scheduler gRPC service (smg's grpc://HOST:PORT workers) on this port (default: off)",
    )
    g.add_argument(
        "--grpc-max-message-bytes",
        type=int,
        default=d.grpc_max_message_bytes,
        help="largest gRPC message received or sent on --grpc-port",
    )
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
        drain_timeout=args.drain_timeout,
        grpc_port=args.grpc_port,
        grpc_max_message_bytes=args.grpc_max_message_bytes,
    )
    return engine, server


def run(args: argparse.Namespace) -> int:
    from pd_serve.bootstrap.cli import check_port_free
    from pd_serve.bootstrap.config import BootstrapConfigError
    from pd_serve.model.source import check_model_source

    try:
        args = cli_config.resolve(args, ServerConfigError)
        engine, server = configs_from_args(args)
        log = LogConfig(ROLE, args.log_level, args.log_format)
        if args.print_config:
            return cli_config.print_config(args)
        check_model_source(engine.model)
        check_port_free(server.host, server.port)
        if server.grpc_port is not None:
            check_port_free(server.host, server.grpc_port)
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
    from pd_serve.granian_server import granian_server

    setup_logging(log.role, log.level, log.fmt)
    granian = granian_server("pd_serve.server.app:create_app", server.host, server.port, log.level,
                             server.ssl_certfile, server.ssl_keyfile, log_dictconfig=granian_log_config())
    _drain_before_stop(granian, server.drain_timeout)
    granian.serve(target_loader=target_loader or partial(build_app, engine, server, log), wrap_loader=False)
    return 0


def _drain_before_stop(granian: Any, drain_timeout: float = 0.0) -> None:
    """On SIGINT/SIGTERM, first tell the worker to drain (DRAIN_SIGNAL), then stop it as Granian does:
    at once with `drain_timeout` 0 or on a second signal, else once the worker says its drain is over
    (DRAINED_SIGNAL), or `drain_timeout` + DRAIN_SLACK_S later should it never say so.

    Granian stops a worker gracefully: it waits for open connections, and a stream may run for
    minutes. Draining first ends those requests (finished, or aborted in the engine), so the stop is
    prompt. This wraps Granian's supervisor signal handlers (`signal_handler_interrupt` and
    `signal_handler_reload`, installed by `serve()`); should a later Granian rename them, shutdown
    still works, only slower and without the drain. Every handler goes through a `SignalRelay`:
    the worker's DRAINED_SIGNAL may land while a SIGTERM's handler is inside `Event.set`, and a
    handler that takes that lock again hangs the supervisor for good.
    """
    import logging
    import os
    import signal
    import threading

    from pd_serve.server.state import DRAIN_SIGNAL, DRAINED_SIGNAL
    from pd_serve.signals import relay_granian_signals

    stop = granian.signal_handler_interrupt
    signals = 0

    def drain_then_stop(*_: Any) -> None:
        nonlocal signals
        signals += 1
        for worker in list(getattr(granian, "wrks", [])):
            pid = getattr(getattr(worker, "inner", None), "pid", None)
            if pid is not None and worker.is_alive():
                os.kill(pid, DRAIN_SIGNAL)
        if drain_timeout <= 0 or signals > 1 or not getattr(granian, "wrks", None):
            stop()
            return
        late = threading.Timer(drain_timeout + DRAIN_SLACK_S, stop)
        late.daemon = True
        late.start()

    def refuse_reload(signum: int) -> None:
        # Granian's reload starts the new worker before it stops the old one, and each worker owns
        # an engine: two engines at once, which a GPU sized for one cannot hold
        logging.getLogger(__name__).warning(
            "signal %d (SIGHUP) ignored: a node does not reload in place, as its new worker would load a "
            "second engine beside the first; restart the node instead (SIGTERM drains it)", signum
        )

    relay = relay_granian_signals(granian, drain_then_stop, refuse_reload)
    signal.signal(DRAINED_SIGNAL, relay.relayed(lambda _: stop()))
    # Ignored and blocked here, and so in the worker (fork, and exec, keep both) until its app takes the
    # signal over: one sent to a worker still starting then waits for it, pending. By default it killed
    # that worker (exit 1, and the engine it had spawned lived on); ignored alone, it would be lost.
    signal.signal(DRAIN_SIGNAL, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {DRAIN_SIGNAL})
