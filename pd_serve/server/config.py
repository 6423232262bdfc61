"""Frozen configuration of a node's HTTP server (`ServerConfig`), the companion of `EngineConfig`.

Validated in `__post_init__`, never mutated; errors name the field and the flag that sets it. The
API key is kept out of `repr()` so that logging a config never leaks it. Standard library and
`pd_serve.config` (for `require`) only: `pd-serve --help` imports this module.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import partial

from pd_serve.config import ConfigError, require


class ServerConfigError(ConfigError):
    """A server configuration value is invalid; the message names the field and its flag."""


_require = partial(require, error=ServerConfigError)


@dataclass(frozen=True)
class ServerConfig:
    """Where a node listens, who may call it, and how much it accepts."""

    host: str = "127.0.0.1"
    port: int = 30000
    api_key: str | None = field(default=None, repr=False)  # never logged
    # prefill/decode roles: pd requests and internal routes need it in X-PD-Cluster-Token; never logged
    cluster_token: str | None = field(default=None, repr=False)
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    max_request_bytes: int = 4 * 1024 * 1024
    max_queued_requests: int = 1024  # engine requests waiting beyond --max-running-requests
    profile_dir: str | None = None  # default directory for /start_profile traces
    served_model_name: str | None = None  # None: from --model (source.default_served_name)
    log_level: str = "info"
    # on SIGTERM/SIGINT: seconds in-flight requests may run on (no new work taken) before the rest
    # is aborted; 0: abort at once
    drain_timeout: float = 0.0
    # prefill role: the port where decode nodes driven by SGLang's router fields (smg) read its transfer
    # endpoint (`bootstrap_host:bootstrap_port`); None: its HTTP port answers
    bootstrap_port: int | None = None
    # SGLang's scheduler gRPC service (smg's `grpc://` workers) on this port, beside HTTP; None: off
    grpc_port: int | None = None
    grpc_max_message_bytes: int = 64 * 1024 * 1024  # largest gRPC message either way

    def __post_init__(self) -> None:
        _require(bool(self.host), "host", "must not be empty")
        _require(0 <= self.port <= 65535, "port", f"{self.port} is outside 0..65535")
        if self.api_key is not None:
            _require(bool(self.api_key.strip()), "api_key", "is empty; leave it unset or give a key")
        if self.cluster_token is not None:
            _require(bool(self.cluster_token.strip()), "cluster_token", "is empty; leave it unset or give a token")
        _require(
            (self.ssl_certfile is None) == (self.ssl_keyfile is None),
            "ssl_certfile",
            "--ssl-certfile and --ssl-keyfile must be given together",
        )
        for name in ("ssl_certfile", "ssl_keyfile"):
            path = getattr(self, name)
            _require(path is None or os.path.isfile(path), name, f"{path!r} is not a readable file")
        if self.bootstrap_port is not None:
            _require(1 <= self.bootstrap_port <= 65535, "bootstrap_port", f"{self.bootstrap_port} is outside 1..65535")
        if self.grpc_port is not None:
            _require(1 <= self.grpc_port <= 65535, "grpc_port", f"{self.grpc_port} is outside 1..65535")
            _require(self.grpc_port != self.port, "grpc_port", f"{self.grpc_port} is the HTTP port (--port); give another")
        _require(
            1024 <= self.grpc_max_message_bytes <= 2**31 - 1,
            "grpc_max_message_bytes",
            f"{self.grpc_max_message_bytes} is outside 1024..{2**31 - 1} (gRPC's limit)",
        )
        _require(self.max_request_bytes >= 1024, "max_request_bytes", f"{self.max_request_bytes} is below 1024")
        _require(self.max_queued_requests >= 0, "max_queued_requests", "must be >= 0")
        if self.served_model_name is not None:
            _require(bool(self.served_model_name), "served_model_name", "must not be empty")
        _require(
            0 <= self.drain_timeout < float("inf"),  # False for NaN too
            "drain_timeout",
            f"{self.drain_timeout} is not a number of seconds >= 0 (0: abort in-flight requests at once)",
        )
        _require(
            self.log_level in ("debug", "info", "warning", "error"),
            "log_level",
            f"{self.log_level!r} is not one of debug, info, warning, error",
        )

    @property
    def tls(self) -> bool:
        return self.ssl_certfile is not None

    def public_dict(self) -> dict[str, object]:
        """The config as /server_info shows it: the API key and cluster token only as whether one is set."""
        return {
            "host": self.host,
            "port": self.port,
            "api_key_set": self.api_key is not None,
            "cluster_token_set": self.cluster_token is not None,
            "tls": self.tls,
            "max_request_bytes": self.max_request_bytes,
            "max_queued_requests": self.max_queued_requests,
            "profile_dir": self.profile_dir,
            "served_model_name": self.served_model_name,
            "drain_timeout": self.drain_timeout,
            "bootstrap_port": self.bootstrap_port,
            "grpc_port": self.grpc_port,
            "grpc_max_message_bytes": self.grpc_max_message_bytes,
        }
