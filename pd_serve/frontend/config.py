"""Frozen configuration of the frontend (`FrontendConfig`), validated in `__post_init__`.

Errors name the field and the flag that sets it. The API keys and the cluster token are kept out of
`repr()`. Limits: `max_request_bytes`, `max_prompt_chars`, `max_output_tokens` bound each request
(whatever its key); `max_concurrent_per_key` bounds each API key's requests in flight (429), and
`max_concurrent_requests` all of them (503); 0 turns a limit off. Standard library and
`pd_serve.config` (for `require`) only: `pd-serve --help` imports this module.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import partial

from pd_serve.config import ConfigError, require

POLICIES = ("round_robin", "least_load", "power_of_two", "prefix_aware")


class FrontendConfigError(ConfigError):
    """A frontend configuration value is invalid; the message names the field and its flag."""


_require = partial(require, error=FrontendConfigError)


@dataclass(frozen=True)
class FrontendConfig:
    """Where the frontend listens, where it finds nodes, and how it picks and retries them."""

    host: str = "127.0.0.1"
    port: int = 8000
    bootstrap: str | None = None  # bootstrap URL; None: static lists only
    prefill_urls: tuple[str, ...] = ()
    decode_urls: tuple[str, ...] = ()
    policy: str = "round_robin"
    max_retries: int = 2  # extra attempts on another pair, only before the client saw a byte
    local_prefill_threshold: int = 0  # prompts shorter than this many characters go to decode alone
    api_keys: tuple[str, ...] = field(default=(), repr=False)  # any of them opens the API; none: open
    node_api_key: str | None = field(default=None, repr=False)  # sent to nodes as a bearer token
    cluster_token: str | None = field(default=None, repr=False)  # bootstrap bearer + X-PD-Cluster-Token to nodes
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    breaker_failures: int = 3  # consecutive failures that open a node's breaker
    breaker_cooldown: float = 5.0  # seconds open before one probe request is let through
    connect_timeout: float = 5.0
    upstream_timeout: float = 600.0  # longest silence from a node (headers or between chunks)
    probe_interval: float = 1.0  # static nodes: seconds between /health probes; bootstrap: load refresh
    prefix_chars: int = 256  # prefix_aware: characters of the prompt that name its prefix
    prefix_balance: float = 4.0  # prefix_aware: leave the owner when its load > min load + this
    max_request_bytes: int = 4 * 1024 * 1024
    max_prompt_chars: int = 0  # characters of the prompt text (the frontend does not tokenize); 0: off
    max_output_tokens: int = 0  # largest max_tokens / max_completion_tokens a request may ask; 0: off
    max_concurrent_per_key: int = 0  # generation requests in flight per API key (429 past it); 0: off
    max_concurrent_requests: int = 2048  # generation requests in flight in all (503 past it); 0: off
    max_queued_requests: int = 1024  # requests waiting here while every decode node is full (503 past it)
    queue_timeout: float = 300.0  # how long one may wait there (503 after it)
    log_level: str = "info"

    def __post_init__(self) -> None:
        _require(bool(self.host), "host", "must not be empty")
        _require(0 <= self.port <= 65535, "port", f"{self.port} is outside 0..65535")
        _require(
            self.bootstrap is not None or bool(self.decode_urls),
            "bootstrap",
            "give --bootstrap URL, or static node lists (--decode URL ... [--prefill URL ...])",
        )
        _require(
            self.bootstrap is None or not (self.decode_urls or self.prefill_urls),
            "bootstrap",
            "use either --bootstrap or the static lists (--prefill/--decode), not both",
        )
        _require(
            self.bootstrap is None or _is_url(self.bootstrap),
            "bootstrap",
            f"{self.bootstrap!r} is not an http(s):// URL",
        )
        for name in ("prefill_urls", "decode_urls"):
            flag = name.split("_")[0]
            for url in getattr(self, name):
                _require(_is_url(url), flag, f"{url!r} is not an http(s):// URL")
            _require(len(set(getattr(self, name))) == len(getattr(self, name)), flag, "a URL is listed twice")
        _require(self.policy in POLICIES, "policy", f"{self.policy!r} is not one of {', '.join(POLICIES)}")
        _require(0 <= self.max_retries <= 10, "max_retries", f"{self.max_retries} is outside 0..10")
        _require(self.local_prefill_threshold >= 0, "local_prefill_threshold", "must be >= 0 (0 = off)")
        for key in self.api_keys:
            _require(bool(key.strip()) and key == key.strip(), "api_key", "a key is empty or has spaces around it")
        _require(len(set(self.api_keys)) == len(self.api_keys), "api_key", "a key is given twice")
        for name in ("node_api_key", "cluster_token"):
            key = getattr(self, name)
            _require(key is None or bool(key.strip()), name, "is empty; leave it unset or give a key")
        _require(
            (self.ssl_certfile is None) == (self.ssl_keyfile is None),
            "ssl_certfile",
            "--ssl-certfile and --ssl-keyfile must be given together",
        )
        for name in ("ssl_certfile", "ssl_keyfile"):
            path = getattr(self, name)
            _require(path is None or os.path.isfile(path), name, f"{path!r} is not a readable file")
        _require(self.breaker_failures >= 1, "breaker_failures", "must be >= 1")
        for name in (
            "breaker_cooldown",
            "connect_timeout",
            "upstream_timeout",
            "probe_interval",
            "prefix_balance",
            "queue_timeout",
        ):
            _require(getattr(self, name) > 0, name, f"{getattr(self, name)} must be positive")
        _require(self.prefix_chars >= 1, "prefix_chars", "must be >= 1")
        _require(
            self.max_request_bytes >= 1024, "max_request_bytes", f"{self.max_request_bytes} is below 1024"
        )
        for name in ("max_prompt_chars", "max_output_tokens", "max_concurrent_per_key", "max_concurrent_requests",
                     "max_queued_requests"):
            _require(getattr(self, name) >= 0, name, f"{getattr(self, name)} must be >= 0 (0: no limit)")
        _require(
            self.log_level in ("debug", "info", "warning", "error"),
            "log_level",
            f"{self.log_level!r} is not one of debug, info, warning, error",
        )

    @property
    def static(self) -> bool:
        """True when nodes come from --prefill/--decode lists rather than bootstrap."""
        return self.bootstrap is None

    @property
    def tls(self) -> bool:
        return self.ssl_certfile is not None

    @property
    def node_headers(self) -> dict[str, str]:
        """The credentials every request to a node carries: --node-api-key as a bearer, and the
        cluster token in X-PD-Cluster-Token (the nodes' pd plane)."""
        headers = {"authorization": f"Bearer {self.node_api_key}"} if self.node_api_key else {}
        if self.cluster_token:
            headers["x-pd-cluster-token"] = self.cluster_token
        return headers


def _is_url(url: str) -> bool:
    scheme, _, rest = url.partition("://")
    return scheme in ("http", "https") and bool(rest.strip("/")) and " " not in url
