"""The Granian server every service (bootstrap, node, frontend) runs, built in one place.

Granian itself is imported inside `granian_server`, never at module scope (`pd-serve --help` must
stay light). Standard library only at import time.
"""

from __future__ import annotations

from typing import Any


def granian_server(
    target: str,
    host: str,
    port: int,
    log_level: str,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
    log_dictconfig: dict[str, Any] | None = None,
) -> Any:
    """The Granian server every service runs: one ASGI worker, HTTP/1.1 and HTTP/2 on one port (h2c
    on plain TCP, ALPN h2 with TLS), no access log; `log_dictconfig` is Granian's logging config (its
    own default: plain lines on stdout). Granian is imported here, not at module scope.

    Where `setproctitle` is installed (smg depends on it), Granian retitles its processes
    "granian asgi ADDR TARGET"; we keep the command line the user typed instead (the worker gets
    " worker-1" after it), so `ps` and `pgrep -f "pd-serve decode"` still find the node."""
    import importlib.util
    import sys
    from pathlib import Path

    from granian import Granian
    from granian.constants import HTTPModes, Interfaces
    from granian.log import LogLevels

    return Granian(
        target,
        address=host,
        port=port,
        interface=Interfaces.ASGI,
        workers=1,
        http=HTTPModes.auto,
        ssl_cert=Path(ssl_certfile) if ssl_certfile else None,
        ssl_key=Path(ssl_keyfile) if ssl_keyfile else None,
        log_level=LogLevels(log_level),
        log_access=False,
        log_dictconfig=log_dictconfig,
        process_name=" ".join(sys.orig_argv) if importlib.util.find_spec("setproctitle") else None,
    )
