"""OpenAI-shaped error bodies the frontend itself produces: `{"error": {message, type, param, code}}`.

The same shape as the node's `pd_serve/server/errors.py` (kept separate so that the frontend does not
import the node package); errors relayed from a node pass through unchanged. Never a stack trace.
"""

from __future__ import annotations

from typing import Any

import orjson

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "upstream_error",
}
RETRY_AFTER_S = "1"


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    kind = _TYPES.get(status, "invalid_request_error" if status < 500 else "internal_server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_bytes(status: int, message: str, param: str | None = None, code: str | None = None) -> bytes:
    return orjson.dumps(error_body(status, message, param, code))


def sse_error(status: int, message: str, code: str | None = None) -> bytes:
    """An error event for a stream whose status line is already gone."""
    return b"data: " + error_bytes(status, message, code=code) + b"\n\n"
