"""The OpenAI error shape the node and the frontend answer with, and the error codes they share.

`error_body` builds `{"error": {"message", "type", "param", "code"}}`; `ErrorCode` is every `code`
either of them sends, declared once: the frontend reads a node's code (a decode node's
`prefill_unreachable` blames the prefill node) by comparing with the same member the node wrote.
Bootstrap has its own `{"detail": str}`. Standard library only.
"""

from __future__ import annotations

from enum import Enum
from typing import Any


class ErrorCode(str, Enum):
    """An OpenAI error body's `code`; the member is its own string (`str(code)`, JSON, comparison)."""

    # the node's answers
    CLIENT_CLOSED = "client_closed"
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
    DRAINING = "draining"
    ENGINE_UNAVAILABLE = "engine_unavailable"
    MODEL_NOT_FOUND = "model_not_found"
    PREFILL_FAILED = "prefill_failed"
    PROFILE_STATE = "profile_state"
    QUEUE_FULL = "queue_full"
    STARTING = "starting"
    TOO_MANY_CHOICES = "too_many_choices"
    MISSING_CLUSTER_TOKEN = "missing_cluster_token"
    INVALID_CLUSTER_TOKEN = "invalid_cluster_token"
    # a decode node that cannot reach the request's prefill node for the KV (gone from the
    # registry, or its transfer endpoint refuses): the frontend retries without that prefill node
    PREFILL_UNREACHABLE = "prefill_unreachable"
    # the frontend's own answers
    DECODE_STREAM_BROKEN = "decode_stream_broken"
    DECODE_UNREACHABLE = "decode_unreachable"
    INCOMPLETE_BODY = "incomplete_body"
    NO_NODE = "no_node"
    NO_PAIR = "no_pair"
    OVERLOADED = "overloaded"
    TOO_MANY_REQUESTS = "too_many_requests"
    PROMPT_TOO_LONG = "prompt_too_long"
    MAX_TOKENS_TOO_LARGE = "max_tokens_too_large"
    # either side
    INTERNAL_ERROR = "internal_error"
    INVALID_API_KEY = "invalid_api_key"
    INVALID_VALUE = "invalid_value"
    NOT_FOUND = "not_found"
    REQUEST_TOO_LARGE = "request_too_large"

    def __str__(self) -> str:
        return str(self.value)


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    500: "internal_server_error",
    503: "service_unavailable",
}


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None, kind: str | None = None
) -> dict[str, Any]:
    """`{"error": {"message", "type", "param", "code"}}`; the type follows `status` unless `kind` is given."""
    if kind is None:
        kind = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "internal_server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
