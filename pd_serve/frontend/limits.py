"""The frontend's checks of a generation request's body before any node sees it: `parse_body` (a JSON
object, no `pd`: only the frontend sets it, and nodes trust what the frontend sends), then its limits;
and `prompt_text`, the prompt as both the limits and the pairing policies read it.

`--max-prompt-chars` bounds the prompt's text in characters (the frontend does not tokenize; nodes
refuse prompts past their context in tokens); `--max-output-tokens` bounds `max_tokens` and
`max_completion_tokens`, and is written into a request that asks for neither, so that no request
can ask a node for more. Values of the wrong type are left to the node, which names them in its 400.
The body-size limit (`--max-request-bytes`, 413) and the in-flight limits (`load.Admission`) are
applied before the body is parsed. Nothing here logs a request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from pd_serve.frontend.config import FrontendConfig
from pd_serve.openai_errors import ErrorCode

_MAX_TOKEN_FIELDS = ("max_tokens", "max_completion_tokens")


def parse_body(raw: bytes) -> tuple[dict[str, Any] | None, str]:
    """The JSON object, or None and what is wrong with it (the 400 message)."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return None, f"the body is not valid JSON: {exc}"
    if not isinstance(body, dict):
        return None, "the body must be a JSON object"
    if "pd" in body:
        return None, "pd: this field is set by the frontend; leave it out"
    if not isinstance(body.get("stream", False), bool):
        return None, "stream: must be true or false"
    return body, ""


def param_of(problem: str) -> str | None:
    """The field a `parse_body` problem names, if any."""
    head = problem.split(":", 1)[0]
    return head if head in ("pd", "stream") else None


@dataclass(frozen=True)
class LimitError:
    """A request over a limit: the 400's message, the field it names and the error code."""

    message: str
    param: str
    code: str


def check_limits(body: dict[str, Any], config: FrontendConfig) -> LimitError | None:
    """The first limit `body` breaks, or None."""
    if config.max_prompt_chars:
        chars = len(prompt_text(body))
        if chars > config.max_prompt_chars:
            param = "messages" if "messages" in body else "prompt"
            return LimitError(
                f"{param}: the prompt has {chars} characters, over this frontend's limit of "
                f"{config.max_prompt_chars} (--max-prompt-chars)",
                param,
                ErrorCode.PROMPT_TOO_LONG,
            )
    cap = config.max_output_tokens
    for name in _MAX_TOKEN_FIELDS if cap else ():
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > cap:
            return LimitError(
                f"{name}: {value} is over this frontend's limit of {cap} (--max-output-tokens)",
                name,
                ErrorCode.MAX_TOKENS_TOO_LARGE,
            )
    return None


def cap_output(body: dict[str, Any], config: FrontendConfig) -> bool:
    """Give a request that names no output limit `max_tokens` = --max-output-tokens; True if it did."""
    if not config.max_output_tokens or any(body.get(name) is not None for name in _MAX_TOKEN_FIELDS):
        return False
    body["max_tokens"] = config.max_output_tokens
    return True


def prompt_text(body: dict[str, Any]) -> str:
    """The prompt's text as the policies see it: chat message contents, or the completion prompt."""
    messages = body.get("messages")
    if isinstance(messages, list):
        return "\n".join(_content_text(m.get("content")) for m in messages if isinstance(m, dict))
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return "\n".join(
            p if isinstance(p, str) else " ".join(map(str, p)) if isinstance(p, list) else str(p)
            for p in prompt
        )
    return ""


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only the text ones count
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""
