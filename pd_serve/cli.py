"""The `pd-serve` command: one subcommand per role.

Each subcommand lives in the package that owns it, as a module with `add_arguments(parser)` and
`run(args) -> int`. Those modules must import only argparse-level things at module scope, so that
`pd-serve --help` never loads torch or starts anything.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("pd_serve.engine.cli", "generate text offline with the engine (no server)"),
    "bootstrap": ("pd_serve.bootstrap.cli", "run the rendezvous service: node registry, heartbeats, pair checks"),
    "colocated": ("pd_serve.server.cli", "serve the OpenAI API from one engine doing prefill and decode"),
    "prefill": ("pd_serve.server.role_cli", "serve a prefill node: computes prompt KV and pushes it to decode nodes"),
    "decode": ("pd_serve.server.role_cli", "serve a decode node: receives prompt KV, decodes, streams tokens"),
    "frontend": ("pd_serve.frontend.cli", "the OpenAI edge: pairs each request with a prefill and a decode node"),
    "up": ("pd_serve.frontend.up", "run a local cluster: bootstrap, prefill and decode nodes, frontend"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pd-serve", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=_version())
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def _version() -> str:
    from pd_serve import __version__

    return f"pd-serve {__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
