"""`python -m pd_serve.bootstrap`: the same as `pd-serve bootstrap`, without loading the other roles."""

from __future__ import annotations

import argparse
import sys

from pd_serve.bootstrap import cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pd-serve bootstrap", description=cli.__doc__.splitlines()[0])
    cli.add_arguments(parser)
    return cli.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
