"""Write docs/flags.md: every flag of every `pd-serve` role, read from the parsers themselves.

    python tools/gen_flag_table.py          # rewrite docs/flags.md
    python tools/gen_flag_table.py --check  # exit 1 if docs/flags.md is not what the code says

tests/unit/test_docs.py runs the check, so a flag added without regenerating fails CI.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pd_serve.cli import SUBCOMMANDS, build_parser
from pd_serve.cli_config import default_of

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "docs" / "flags.md"
HEADER = """# Flags of every role

Generated from the code by `python tools/gen_flag_table.py`; do not edit by hand (a test compares).
Every flag can also be set in a `--config FILE.yaml` file, as `flag-name: value` without the dashes
(`pd-serve ROLE --config F --print-config` shows the result); a flag on the command line wins over
the file, and the file over the default.
"""


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _default(action: argparse.Action) -> str:
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        return "off"
    value = default_of(action)
    if value is None or value == []:
        return ""
    return f"`{value}`"


def _flag(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.dest}` (positional)"
    names = ", ".join(f"`{o}`" for o in action.option_strings)
    takes_value = action.nargs != 0
    return f"{names} {action.metavar or action.dest.upper()}" if takes_value else names


def role_table(name: str, parser: argparse.ArgumentParser) -> list[str]:
    lines = [f"## pd-serve {name}", "", SUBCOMMANDS[name][1] + ".", ""]
    lines += ["| flag | default | values | what it does |", "| --- | --- | --- | --- |"]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        choices = ", ".join(map(str, action.choices)) if action.choices else ""
        lines.append(f"| {_flag(action)} | {_cell(_default(action))} | {_cell(choices)} | {_cell(action.help or '')} |")
    return lines + [""]


def render() -> str:
    top = build_parser()
    subparsers = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    lines = [HEADER]
    for name in SUBCOMMANDS:
        lines += role_table(name, subparsers.choices[name])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not TABLE.exists() or TABLE.read_text() != text:
            print(f"{TABLE} is out of date: run python tools/gen_flag_table.py", file=sys.stderr)
            return 1
        return 0
    TABLE.write_text(text)
    print(f"wrote {TABLE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
