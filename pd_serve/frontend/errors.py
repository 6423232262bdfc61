"""OpenAI-shaped error bodies the frontend itself produces: `{"error": {message, type, param, code}}`.

The shape is `pd_serve.openai_errors.error_body`, the node's too; only the frontend's 502 and 504 (a
node failed it) are typed "upstream_error". Errors relayed from a node pass through unchanged. Never
a stack trace.
"""

from __future__ import annotations

import orjson

from pd_serve.openai_errors import error_body

RETRY_AFTER_S = "1"
_UPSTREAM_STATUSES = frozenset({502, 504})


def error_bytes(status: int, message: str, param: str | None = None, code: str | None = None) -> bytes:
    kind = "upstream_error" if status in _UPSTREAM_STATUSES else None
    return orjson.dumps(error_body(status, message, param, code, kind))


def sse_error(status: int, message: str, code: str | None = None) -> bytes:
    """An error event for a stream whose status line is already gone."""
    return b"data: " + error_bytes(status, message, code=code) + b"\n\n"
