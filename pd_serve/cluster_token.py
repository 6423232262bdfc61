"""The cluster token: one secret for the whole internal plane (bootstrap, transfer handshakes, the
nodes' pd requests).

- `read_cluster_token`: from `--cluster-token-file`, else $PD_SERVE_CLUSTER_TOKEN, else None (open);
  `read_secret_file` reads that file (and the frontend's `--api-key-file`).
- `warn_if_open`: the one startup warning of a role running without one.

It travels between services in the `X-PD-Cluster-Token` header (`CLUSTER_TOKEN_HEADER`, compared by
`http_common.token_ok`), never in argv. No message here ever contains the token. Standard library
only: `bootstrap` and `pd-serve --help` import it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import MutableMapping

CLUSTER_TOKEN_ENV = "PD_SERVE_CLUSTER_TOKEN"
CLUSTER_TOKEN_HEADER = "x-pd-cluster-token"
CLUSTER_TOKEN_FLAG = "--cluster-token-file"
# The per-purpose secrets of earlier versions: refused rather than ignored, since ignoring one would
# silently run an internal plane without auth that its operator believes is protected.
_RETIRED_TOKEN_ENVS = ("PD_SERVE_BOOTSTRAP_TOKEN", "PD_SERVE_TRANSFER_TOKEN")


def read_cluster_token(
    path: str | os.PathLike[str] | None,
    error: type[ValueError] = ValueError,
    env: MutableMapping[str, str] | None = None,
) -> str | None:
    """The cluster token: the stripped content of `path` (--cluster-token-file) if given, else
    $PD_SERVE_CLUSTER_TOKEN, else None (no auth). Raises `error` naming the flag or variable, never
    the token."""
    environ = os.environ if env is None else env
    if path is not None:
        token = read_secret_file(path, f"cluster_token_file ({CLUSTER_TOKEN_FLAG})", error).strip()
        if not token:
            raise error(f"cluster_token_file ({CLUSTER_TOKEN_FLAG}): {path} is empty")
        return token
    token = environ.get(CLUSTER_TOKEN_ENV, "").strip()
    if not token:
        for old in _RETIRED_TOKEN_ENVS:
            if environ.get(old):
                raise error(
                    f"{old} is no longer read: one cluster token now protects bootstrap, transfers and pd "
                    f"requests; put the same secret in {CLUSTER_TOKEN_ENV} (or {CLUSTER_TOKEN_FLAG}) on every process"
                )
    return token or None


def read_secret_file(path: str | os.PathLike[str], setting: str, error: type[ValueError]) -> str:
    """The text of a file that holds secrets; `error` naming `setting` (its field and flag) and the
    path, never the content, when it cannot be read."""
    try:
        with open(path) as f:
            return f.read()
    except OSError as exc:
        raise error(f"{setting}: cannot read {path}: {exc.strerror}") from exc


def warn_if_open(log: logging.Logger, role: str, token: str | None) -> None:
    """The one startup warning of a role running without a cluster token."""
    if token is None:
        log.warning(
            "no cluster token (%s or $%s): the internal plane of this %s (bootstrap registry, KV "
            "transfer handshakes, pd requests to nodes) is unauthenticated; anyone who can reach its "
            "ports can register nodes, receive KV or inject rooms. Fine on a laptop, not on a network.",
            CLUSTER_TOKEN_FLAG, CLUSTER_TOKEN_ENV, role,
        )
