"""Frozen configuration of the bootstrap role, and where its auth token comes from.

`BootstrapConfig` is validated in `__post_init__` and never mutated; errors name the field and the
flag that sets it. The token is kept out of `repr()` so that logging a config never leaks it.
This module imports only the standard library and `pd_serve.config` (for `require`): `pd-serve --help`
loads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from pd_serve.cluster_token import CLUSTER_TOKEN_ENV, read_cluster_token
from pd_serve.config import ConfigError, require

TOKEN_ENV = CLUSTER_TOKEN_ENV
_STORE_SCHEMES = ("redis://", "rediss://", "unix://")


class BootstrapConfigError(ConfigError):
    """A bootstrap configuration value is invalid; the message names the field and its flag."""


_require = partial(require, error=BootstrapConfigError)


@dataclass(frozen=True)
class BootstrapConfig:
    """What one bootstrap replica needs: where to listen, which store, TTL and limits."""

    host: str = "127.0.0.1"
    port: int = 8998
    store: str = "memory"  # "memory" or a redis URL: redis://HOST:PORT/DB
    auth_token: str | None = field(default=None, repr=False)  # never logged
    node_ttl: float = 10.0  # seconds after the last heartbeat
    max_nodes: int = 4096
    max_body_bytes: int = 64 * 1024
    poll_interval: float = 0.5  # how often long-polls look for changes made elsewhere (replicas, expiries)
    redis_prefix: str = "pd-serve:bootstrap"
    log_level: str = "info"

    def __post_init__(self) -> None:
        _require(bool(self.host), "host", "must not be empty")
        _require(0 <= self.port <= 65535, "port", f"{self.port} is outside 0..65535")
        _require(
            self.store == "memory" or self.store.startswith(_STORE_SCHEMES),
            "store",
            f"{_redact(self.store)!r} is neither 'memory' nor a redis:// URL",
        )
        if self.auth_token is not None:
            _require(bool(self.auth_token.strip()), "auth_token", "is empty; unset it or give a token")
        _require(0.05 <= self.node_ttl <= 86400, "node_ttl", f"{self.node_ttl} is outside 0.05..86400 s")
        _require(1 <= self.max_nodes <= 1_000_000, "max_nodes", f"{self.max_nodes} is outside 1..1000000")
        _require(self.max_body_bytes >= 1024, "max_body_bytes", "must be at least 1024")
        _require(0 < self.poll_interval <= 1.0, "poll_interval", f"{self.poll_interval} is outside (0, 1] s")
        _require(bool(self.redis_prefix), "redis_prefix", "must not be empty")
        _require(
            self.log_level in ("debug", "info", "warning", "error"),
            "log_level",
            f"{self.log_level!r} is not one of debug, info, warning, error",
        )

    @property
    def store_display(self) -> str:
        """The store with any password removed, for logs."""
        return _redact(self.store)


def _redact(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"


def read_token(token_file: str | Path | None = None, env: dict[str, str] | None = None) -> str | None:
    """The cluster token, the bearer token of every route but /health: the file's stripped content if
    given (--cluster-token-file), else $PD_SERVE_CLUSTER_TOKEN, else None."""
    return read_cluster_token(token_file, BootstrapConfigError, env)
