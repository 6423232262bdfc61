"""One logging setup for every `pd-serve` process: `--log-level`, `--log-format text|json`, redaction.

`setup_logging(role, level, fmt)` puts one stderr handler on the root logger (replacing the one an
earlier call put there) with either the text format (`TIME LEVEL ROLE LOGGER: MESSAGE`) or JSON, one
object per line (`ts`, `level`, `logger`, `role`, `pid`, `msg`, `exc` when there is a traceback, and the
JSON-serialisable `extra={...}` fields; others as their repr). Granian's own loggers are routed to that
handler through `granian_log_config()`; the engine process asks `current()` for its API process's
settings and calls `setup_logging` with them. `RedactSecrets`, on the handler, masks obvious secrets
(Authorization and Bearer values, X-PD-Cluster-Token values, `api_key=`/`token=` pairs) in every
message, string extra and traceback: a safety net, never a licence to log a secret.
Formatting must never raise: an odd record (a message that does not format, an extra that does not
serialise) is logged as best it can be. Standard library only: every role's CLI imports this.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from dataclasses import dataclass
from typing import Any

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s {role} %(name)s: %(message)s"
_MASK = "***"
# attributes every LogRecord has; anything else on a record came from `extra=`
_RECORD_KEYS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}


@dataclass(frozen=True)
class LogConfig:
    """How a process logs: its role (a field of every line), level and format."""

    role: str
    level: str = "info"
    fmt: str = "text"

    def __post_init__(self) -> None:
        if not self.role:
            raise ValueError("log role must not be empty")
        if self.level not in LEVELS:
            raise ValueError(f"log_level (--log-level): {self.level!r} is not one of {', '.join(LEVELS)}")
        if self.fmt not in FORMATS:
            raise ValueError(f"log_format (--log-format): {self.fmt!r} is not one of {', '.join(FORMATS)}")


def add_log_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """`--log-level` and `--log-format`, the same on every role."""
    parser.add_argument("--log-level", default="info", choices=LEVELS, help="least severe level logged")
    parser.add_argument(
        "--log-format",
        default="text",
        choices=FORMATS,
        help="stderr log lines: text, or json (one object per line: ts, level, logger, role, pid, msg, exc)",
    )


def setup_logging(role: str, level: str, fmt: str) -> LogConfig:
    """Log records of this process to stderr as `fmt` says, from `level` up; returns the settings.
    Calling it again (a Granian worker after its supervisor) replaces the handler, never adds one."""
    config = LogConfig(role, level, fmt)
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _RoleHandler):
            root.removeHandler(handler)
    root.addHandler(_RoleHandler(config))
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # warnings.warn() lines in the same format, not raw stderr
    return config


def current() -> LogConfig | None:
    """The settings of the last `setup_logging` in this process (None before one): what a child
    process started from here (the engine) passes to its own `setup_logging`."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, _RoleHandler):
            return handler.config
    return None


def granian_log_config() -> dict[str, Any]:
    """Granian's `log_dictconfig`: its loggers (`_granian`, `granian.access`) keep no handler of their
    own and propagate to the root logger, so their lines get this process's format and redaction."""
    loggers = {name: {"handlers": [], "propagate": True} for name in ("_granian", "granian.access")}
    return {"formatters": {}, "handlers": {}, "loggers": loggers}


class _RoleHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The stderr handler `setup_logging` installs; it remembers its settings for `current()`."""

    def __init__(self, config: LogConfig) -> None:
        super().__init__(sys.stderr)
        self.config = config
        self.addFilter(RedactSecrets())
        if config.fmt == "json":
            self.setFormatter(JsonFormatter(config.role))
        else:
            self.setFormatter(logging.Formatter(TEXT_FORMAT.format(role=config.role.replace("%", "%%"))))


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (non-ASCII escaped, so no byte splits a line)."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _iso_utc(record.created),
            "level": record.levelname,
            "logger": record.name,
            "role": self.role,
            "pid": record.process,
            "msg": message_of(record),
        }
        if record.exc_info or record.exc_text:
            out["exc"] = record.exc_text or self.formatException(record.exc_info)  # type: ignore[arg-type]
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        for key, value in extras_of(record).items():
            out.setdefault(key, value)
        return _dumps(out)


def _iso_utc(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


def _dumps(out: dict[str, Any]) -> str:
    try:
        return json.dumps(out, default=safe_repr, allow_nan=False)
    except (TypeError, ValueError, RecursionError):  # non-str keys, NaN, cycles: repr what fails alone
        fixed = {}
        for key, value in out.items():
            try:
                json.dumps(value, default=safe_repr, allow_nan=False)
                fixed[str(key)] = value
            except (TypeError, ValueError, RecursionError):
                fixed[str(key)] = safe_repr(value)
        return json.dumps(fixed, default=safe_repr)


def safe_repr(value: object) -> str:
    try:
        return repr(value)
    except Exception as exc:  # a broken __repr__ must not lose the log line
        return f"<{type(value).__name__} with a failing repr: {type(exc).__name__}>"


def message_of(record: logging.LogRecord) -> str:
    """The record's message; a message that does not format with its args is shown with them."""
    try:
        return record.getMessage()
    except Exception:  # a wrong %-format or a failing __str__ in a caller's record
        return f"{safe_repr(record.msg)} % {safe_repr(record.args)}"


def extras_of(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _RECORD_KEYS and not k.startswith("_")}


# ---- redaction ---------------------------------------------------------------------------------
_TRIGGER = re.compile(r"token|authorization|bearer|api[_-]?key|password|secret", re.IGNORECASE)
_VALUE = r"[^\s'\",;&)}\]]+"
# a header's value: "Authorization: Bearer X", "x-pd-cluster-token=X", {'authorization': 'X'},
# and the ASGI tuple repr (b'x-pd-cluster-token', b'X')
_HEADER = re.compile(
    r"\b((?:proxy-)?authorization|x-pd-cluster-token|x-api-key)"
    r"(['\"]?\s*[:=]\s*(?:b?['\"])?\s*|['\"]\s*,\s*b?['\"])"
    r"((?:bearer|basic|token)\s+)?(" + _VALUE + ")",
    re.IGNORECASE,
)
# api_key=X, token=X, "cluster_token": "X", password=X (a name ending in one of those)
_PAIR = re.compile(
    r"\b([\w-]*(?:token|api[_-]?key|password|secret))(\s*=\s*['\"]?|['\"]\s*:\s*['\"]?)(" + _VALUE + ")",
    re.IGNORECASE,
)
# a bare "Bearer X": X looks like a credential (8+ characters, not only letters: not an English word)
_BEARER = re.compile(r"\b(bearer\s+)((?=[A-Za-z.]*[0-9_~+/=-])[A-Za-z0-9._~+/-]{8,}=*)", re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with the values of obvious secrets replaced by ***; unchanged (and cheap) without any."""
    if not _TRIGGER.search(text):
        return text
    text = _HEADER.sub(lambda m: f"{m[1]}{m[2]}{m[3] or ''}{_MASK}", text)
    text = _PAIR.sub(lambda m: f"{m[1]}{m[2]}{_MASK}", text)
    return _BEARER.sub(lambda m: f"{m[1]}{_MASK}", text)


class RedactSecrets(logging.Filter):
    """Masks secrets (see `redact`) in a record's message, string extras and traceback. Also turns a
    message that does not format into one that does, so no formatter raises on it."""

    _plain = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(message_of(record)), None
        if record.exc_info and not record.exc_text:
            record.exc_text = self._plain.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        for key, value in extras_of(record).items():
            if isinstance(value, str):
                setattr(record, key, redact(value))
        return True
