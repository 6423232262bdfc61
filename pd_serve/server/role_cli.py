"""`pd-serve prefill` and `pd-serve decode`: a node of a disaggregated deployment.

The same process layout as `pd-serve colocated` (Granian supervisor, one API worker, one engine
process; see server/cli.py), plus a transfer engine inside the engine process and registration in
the bootstrap service. The subcommand's name is the role. Only argparse-level imports here.
"""

from __future__ import annotations

import argparse
import dataclasses
import socket
import sys
from functools import partial
from typing import Any

from pd_serve import cli_config
from pd_serve.cluster_token import read_cluster_token
from pd_serve.config import ConfigError, DisaggConfig, EngineConfig
from pd_serve.logs import LogConfig, setup_logging
from pd_serve.server import cli as node_cli
from pd_serve.server.config import ServerConfig, ServerConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    node_cli.add_arguments(parser)
    g = parser.add_argument_group("disaggregation")
    g.add_argument("--bootstrap", default=None, help="bootstrap service URL, e.g. http://127.0.0.1:8998")
    g.add_argument("--node-id", default=None, help="id in the registry (default: ROLE-HOST-PORT)")
    g.add_argument("--advertise-url", default=None, help="HTTP address peers and the frontend use (default: http://HOST:PORT)")
    g.add_argument("--cluster-token-file", default=None,
                   help="file holding the cluster token: bootstrap auth, transfer handshakes and pd requests "
                        "(default: $PD_SERVE_CLUSTER_TOKEN, else none: the internal plane is open)")
    g.add_argument("--transfer-backend", default="auto", choices=("auto", "cma", "ucx", "tcp"),
                   help="KV transfer backend; auto: per peer, cma on one host, else ucx (where ucxx imports), else tcp")
    g.add_argument("--transfer-host", default=None, help="address the transfer endpoint binds and publishes (default: --host)")
    g.add_argument("--transfer-port", type=int, default=0, help="transfer endpoint port (0: any free port)")
    g.add_argument("--transfer-timeout", type=float, default=30.0, help="seconds a room may make no progress before it fails")
    g.add_argument("--transfer-bootstrap-timeout", type=float, default=30.0,
                   help="seconds a room may wait for its peer to know it (the other node's request)")
    g.add_argument("--transfer-waiting-timeout", type=float, default=300.0,
                   help="seconds a room may wait for its KV once both sides know it (prefill queueing)")
    g.add_argument("--queue-timeout", type=float, default=300.0,
                   help="seconds a request may queue for admission (decode: free KV pages; prefill: the decode "
                        "node's admission of its room) before it fails; the room timeouts start after it")
    g.add_argument("--bootstrap-port", type=int, default=None,
                   help="prefill: port answering decode nodes that smg drives (SGLang's bootstrap_port, given to "
                        "smg after the prefill URL) with the transfer endpoint, behind the cluster token "
                        "(default: the HTTP port answers)")
    g.add_argument("--reserve-tokens", type=int, default=256, help="decode: tokens of headroom kept per admitted transfer")
    cli_config.add_config_arguments(parser)


def disagg_config(role: str, args: argparse.Namespace, server: ServerConfig, token: str | None) -> DisaggConfig:
    from pd_serve.transfer import TransferConfig, default_backend

    transfer = TransferConfig(
        backend=args.transfer_backend or default_backend(),
        host=args.transfer_host or (server.host if server.host not in ("0.0.0.0", "::") else socket.gethostname()),
        port=args.transfer_port,
        transfer_timeout=args.transfer_timeout,
        bootstrap_timeout=args.transfer_bootstrap_timeout,
        waiting_timeout=args.transfer_waiting_timeout,
        queue_timeout=args.queue_timeout,
        token=token,
    )
    return DisaggConfig(role=role, transfer=transfer, reserve_tokens=args.reserve_tokens)


def run(args: argparse.Namespace) -> int:
    from pd_serve.bootstrap.cli import check_port_free
    from pd_serve.bootstrap.config import BootstrapConfigError
    from pd_serve.model.source import check_model_source
    from pd_serve.server.roles import Registration
    from pd_serve.transfer import TransferConfigError

    role = args.command
    try:
        args = cli_config.resolve(args, ServerConfigError)
        engine, server = node_cli.configs_from_args(args)
        token = read_cluster_token(args.cluster_token_file, ServerConfigError)
        server = dataclasses.replace(server, cluster_token=token, bootstrap_port=args.bootstrap_port)
        disagg = disagg_config(role, args, server, token)
        http_url = args.advertise_url or f"http{'s' if server.ssl_certfile else ''}://{server.host}:{server.port}"
        node_id = args.node_id or f"{role}-{server.host}-{server.port}".replace(":", "-")
        log = LogConfig(role, args.log_level, args.log_format)
        registration = Registration(
            bootstrap_url=args.bootstrap,
            node_id=node_id,
            http_url=http_url,
            token=token or "",  # "": none, rather than the client's own look at the environment
        )
        if args.print_config:
            return cli_config.print_config(args)
        check_model_source(engine.model)
        check_port_free(server.host, server.port)
        own = server.bootstrap_port
        if role == "prefill" and own is not None and own != server.port:
            check_port_free(server.host, own)  # its own listener (sglang_bootstrap.BootstrapListener)
    except (ConfigError, ServerConfigError, BootstrapConfigError, TransferConfigError, OSError, TypeError, ValueError) as exc:
        print(f"pd-serve {role}: {cli_config.explain(exc, args)}", file=sys.stderr)
        return 2
    if role == "prefill" and not args.bootstrap:
        print(f"pd-serve {role}: no --bootstrap: decode nodes must reach this node by its URL (pd.prefill_url)",
              file=sys.stderr)
    loader = partial(build_app, role, engine, server, disagg, registration, log)
    return node_cli.serve(engine, server, log, target_loader=loader)


def build_app(
    role: str, engine: EngineConfig, server: ServerConfig, disagg: DisaggConfig, registration: Any, log: LogConfig
) -> Any:
    """Runs in the Granian worker: the app and its (not yet started) role backend."""
    import logging

    from pd_serve.cluster_token import warn_if_open
    from pd_serve.server.app import create_app
    from pd_serve.server.roles import DecodeBackend, PrefillBackend
    from pd_serve.server.state import NodeState

    setup_logging(log.role, log.level, log.fmt)
    warn_if_open(logging.getLogger(f"pd_serve.{role}"), f"{role} node", server.cluster_token)
    backend_cls = PrefillBackend if role == "prefill" else DecodeBackend
    return create_app(NodeState(server, engine, backend_cls(engine, disagg, registration)))
