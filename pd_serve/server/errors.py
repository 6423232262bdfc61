"""OpenAI-shaped API errors: `{"error": {"message", "type", "param", "code"}}` with an HTTP status.

Every failure a client can cause is an `APIError` raised where it is found; the app turns it (and
FastAPI's validation and routing errors) into a JSON body of this shape (`openai_errors.error_body`,
shared with the frontend). Nothing here ever puts a stack trace in a response.
"""

from __future__ import annotations

from typing import Any

from pd_serve.openai_errors import ErrorCode, error_body


class APIError(Exception):
    """An error the client gets as OpenAI JSON; `param` names the request field at fault."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)


def bad_request(param: str | None, message: str, code: str | None = ErrorCode.INVALID_VALUE) -> APIError:
    return APIError(400, message, param=param, code=code)
