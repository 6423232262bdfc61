"""An attempt that failed before the client got a byte, as a `Failure`: the status and body the
client gets if no retry is left, whether a retry may follow, and which node is blamed.

- `failure_of(answer, role, node_id)`: P or D answered an error (for D also an error event), or not
  at all.
- `node_fault(status)`: whether a failure counts against the node's circuit breaker.

Pure: the relay does the bookkeeping (breakers, metrics). Client errors (4xx but 429) are never
retryable; no answer, 429 and 5xx are.
"""

from __future__ import annotations

from dataclasses import dataclass

from pd_serve.frontend.answers import Answer
from pd_serve.frontend.errors import error_bytes
from pd_serve.openai_errors import ErrorCode

_UNREACHABLE = {"prefill": ErrorCode.PREFILL_UNREACHABLE, "decode": ErrorCode.DECODE_UNREACHABLE}


@dataclass(frozen=True)
class Failure:
    """An attempt that failed before the client got a byte."""

    status: int
    body: bytes  # OpenAI-shaped JSON
    retryable: bool
    blame: tuple[str, ...]  # node ids not to try again for this request
    reason: str  # the retries metric label
    headers: tuple[tuple[bytes, bytes], ...] = ()


def failure_of(answer: Answer, role: str, node_id: str) -> Failure:
    """The attempt lost to node `node_id` (`role`: prefill or decode) answering `answer`."""
    if answer.status == 0:
        code = _UNREACHABLE[role]
        message = f"{role} node {node_id} failed: {answer.detail}"
        return Failure(502, error_bytes(502, message, code=code), True, (node_id,), code)
    return Failure(answer.status, answer.body, retryable(answer.status), (node_id,), f"{role}_{answer.status}")


def node_fault(status: int) -> bool:
    """Failures that count against a node's breaker: no answer, or a 5xx other than 'busy' (503)."""
    return status == 0 or (status >= 500 and status != 503)


def retryable(status: int) -> bool:
    return status == 0 or status == 429 or status >= 500
