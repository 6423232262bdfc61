"""`--config FILE.yaml` and `--print-config` for every `pd-serve` role: one mechanism, one set of rules.

A config file is a YAML mapping of flag names (`max-model-len` or `max_model_len`, without the dashes)
to values. Precedence: a flag given on the command line, then the file, then the flag's default. To
tell a given flag from one left alone, `add_config_arguments` replaces each flag's default with an
`Unset` marker that holds it; `resolve` swaps every marker still there for the file's value or the
default. A value equal to the default but typed on the command line therefore still wins over the file.

Call order, per role: `add_config_arguments(parser)` last in `add_arguments` (again after any flags
added later: it is idempotent); in `run`, `args = resolve(args, RoleError)` before reading any flag;
`--print-config` then prints `dump(args)` and exits 0 without starting anything. File values are
checked against the flag's type and choices here, and errors name the key and the file; the role's
frozen config dataclasses check the rest. Standard library only at import (`pd-serve --help` loads it);
yaml is imported when a file is read or printed.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

_OWN_DESTS = ("config", "print_config", "help", "version")
_SECRET_DESTS = ("api_key", "node_api_key")
_LIST_ACTIONS = (argparse._AppendAction, argparse._ExtendAction, argparse._AppendConstAction)
_FLAG_ACTIONS = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction)


class ConfigFileError(ValueError):
    """A config file cannot be read, or holds a key or value no flag accepts; names the key and file."""


class Unset:
    """A flag's default, marking that the flag was not given on the command line."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return repr(self.value)


class UnsetList(list):  # type: ignore[type-arg]
    """`Unset` for append/extend flags: argparse copies the default before adding to it, and the
    copy is a plain list, so a list that is still an `UnsetList` was never given."""

    @property
    def value(self) -> list[Any]:
        return list(self)

    def __copy__(self) -> list[Any]:
        return list(self)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --config and --print-config (once) and mark every flag's default as `Unset`."""
    if "--config" not in parser._option_string_actions:
        g = parser.add_argument_group("config file")
        g.add_argument("--config", metavar="FILE.yaml", default=None,
                       help="YAML mapping of flag names to values (flags given here win)")
        g.add_argument("--print-config", action="store_true",
                       help="print the effective config as YAML and exit without starting anything")
    parser.set_defaults(_config_parser=parser)
    for action in _config_actions(parser):
        if not isinstance(action.default, Unset | UnsetList):
            is_list = isinstance(action, _LIST_ACTIONS)
            action.default = UnsetList(action.default or []) if is_list else Unset(action.default)


def _config_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [
        a for a in parser._actions
        if a.option_strings and a.dest not in _OWN_DESTS and a.dest != argparse.SUPPRESS
    ]


def default_of(action: argparse.Action) -> Any:
    """A flag's default whether or not `add_config_arguments` marked it."""
    default = action.default
    return default.value if isinstance(default, Unset | UnsetList) else default


def resolve(args: argparse.Namespace, error: type[ValueError] = ConfigFileError) -> argparse.Namespace:
    """The effective flag values: given flags, then the --config file, then defaults. Idempotent.

    Errors in the file raise `error` (the role's config error), naming the key and the file."""
    if getattr(args, "_config_resolved", False) or not hasattr(args, "_config_parser"):
        return args
    parser: argparse.ArgumentParser = args._config_parser
    path = getattr(args, "config", None)
    try:
        from_file = load_file(parser, path) if path else {}
    except ConfigFileError as exc:
        raise error(str(exc)) from exc
    values = {}
    for key, value in vars(args).items():
        if isinstance(value, Unset | UnsetList):
            value = from_file.get(key, value.value)
        values[key] = value
    values.update(_config_resolved=True, _config_sources={dest: path for dest in from_file})
    return argparse.Namespace(**values)


def load_file(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    """The file's values by argparse dest, converted and checked like command-line values."""
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigFileError(f"config (--config): cannot read {path}: {exc}") from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigFileError(f"config (--config): {path} must hold a mapping of flag names to values")
    by_name = _actions_by_name(parser)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key).lstrip("-").replace("_", "-")
        action = by_name.get(name)
        if action is None:
            raise ConfigFileError(
                f"{path}: {key!r} is not a flag of {parser.prog} (see {parser.prog} --help)"
            )
        try:
            values[action.dest] = _convert(action, name, value)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            raise ConfigFileError(f"{path}: {key!r}: {exc}") from exc
    return values


def _actions_by_name(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Each flag by its long option names and by its dest, in the dashed spelling."""
    names: dict[str, argparse.Action] = {}
    for action in _config_actions(parser):
        names.setdefault(action.dest.replace("_", "-"), action)
        for option in action.option_strings:
            if option.startswith("--"):
                names[option[2:]] = action
    return names


def _convert(action: argparse.Action, name: str, value: Any) -> Any:
    flag = f"--{name}"
    if isinstance(action, _FLAG_ACTIONS):
        if not isinstance(value, bool):
            raise ValueError(f"{value!r} is not true or false")
        if name == action.dest.replace("_", "-") and flag not in action.option_strings:
            return value  # named by its dest (e.g. enable-prefix-caching): the value itself
        return action.const if value else default_of(action)
    if isinstance(action, _LIST_ACTIONS) or action.nargs in ("+", "*"):
        items = value if isinstance(value, list) else [value]
        return [_scalar(action, flag, item) for item in items]
    if value is None:
        if default_of(action) is not None:
            raise ValueError(f"null is not allowed ({flag} has default {default_of(action)!r})")
        return None
    return _scalar(action, flag, value)


def _scalar(action: argparse.Action, flag: str, value: Any) -> Any:
    if isinstance(value, bool | list | dict) or value is None:
        raise ValueError(f"{value!r} is not a valid {flag} value")
    kind = action.type
    if kind is int and isinstance(value, float):
        raise ValueError(f"{value!r} is not an integer ({flag})")
    try:
        converted = kind(value) if callable(kind) else str(value)
    except (TypeError, ValueError) as exc:
        expected = getattr(kind, "__name__", "a value")
        raise ValueError(f"{value!r} is not a valid {flag} value (expected {expected})") from exc
    if action.choices is not None and converted not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise ValueError(f"{converted!r} is not one of {choices} ({flag})")
    return converted


def explain(exc: BaseException, args: argparse.Namespace) -> str:
    """The error, plus which file set the value when the message names a flag that came from one."""
    message = str(exc)
    for dest, path in getattr(args, "_config_sources", {}).items():
        if f"--{dest.replace('_', '-')}" in message or f"{dest} (" in message:
            return f"{message} (set in {path})"
    return message


def dump(args: argparse.Namespace) -> str:
    """The effective config of a resolved namespace as YAML, itself a valid --config file for the
    role (API keys shown as '<hidden>'; secrets files are paths, shown as they are)."""
    import yaml

    parser: argparse.ArgumentParser = args._config_parser
    out: dict[str, Any] = {}
    for action in _config_actions(parser):
        name = next(o for o in action.option_strings if o.startswith("--"))[2:]
        value = getattr(args, action.dest)
        if isinstance(action, _FLAG_ACTIONS):
            value = value == action.const
        elif action.dest in _SECRET_DESTS and isinstance(value, list | tuple):
            value = ["<hidden>" for _ in value]
        elif action.dest in _SECRET_DESTS and value is not None:
            value = "<hidden>"
        out[name] = list(value) if isinstance(value, list | tuple) else value
    sources = sorted(set(getattr(args, "_config_sources", {}).values()))
    header = f"# {parser.prog}: effective config (flags, then {', '.join(sources) or 'no file'}, then defaults)\n"
    return header + yaml.safe_dump(out, sort_keys=False, default_flow_style=False)


def print_config(args: argparse.Namespace) -> int:
    """`--print-config`: print `dump(args)`; the exit code (0)."""
    print(dump(args), end="", flush=True)
    return 0
