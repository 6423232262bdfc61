"""Hand-written hostile requests for the OpenAI endpoints (node and frontend alike), and the raw
HTTP/1.1 ones that only a socket can send. Each regression found by the fuzzer stays here, marked.

A case is (id, path, body bytes, extra headers, the field a 400 must name or None).
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from fuzz_support import MODEL, encode

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
JSON = {"content-type": "application/json"}
MSG = [{"role": "user", "content": "hi"}]


class Case(NamedTuple):
    id: str
    path: str
    body: bytes
    headers: dict[str, str]
    field: str | None


def chat(field: str | None = None, raw: str | None = None, **fields: Any) -> tuple[bytes, str | None]:
    """A small valid chat body with `fields` set; `raw` is JSON text spliced in as is (NaN, 1e999)."""
    body = {"model": MODEL, "messages": MSG, "max_tokens": 2, **fields}
    data = encode(body)
    if raw is not None:
        data = data[:-1] + b", " + raw.encode() + b"}"
    return data, field


def completion(field: str | None = None, **fields: Any) -> tuple[bytes, str | None]:
    return encode({"model": MODEL, "prompt": "hi", "max_tokens": 2, **fields}), field


_CHAT_CASES: dict[str, tuple[bytes, str | None]] = {
    # body-level
    "deep-array-100000": (b"[" * 100000, None),
    "deep-object-50000": (b'{"a":' * 50000, None),
    "deep-closed-nesting-in-a-field": (b'{"model":"demo","max_tokens":2,"messages":' + b"[" * 5000 + b"]" * 5000 + b"}", None),
    "invalid-utf8": (b'{"model":"demo","max_tokens":2,"messages":[{"role":"user","content":"\xff\xfe\xc0\xaf"}]}', None),
    "not-json": (b"hello there", None),
    "empty": (b"", None),
    "json-null": (b"null", None),
    "json-array": (b"[1,2]", None),
    "json-string": (b'"x"', None),
    "utf8-bom": (b"\xef\xbb\xbf" + chat()[0], None),
    "utf16": (chat()[0].decode().encode("utf-16"), None),
    "duplicate-keys": (b'{"model":"demo","model":"demo","messages":[],"messages":[{"role":"user","content":"x"}],"max_tokens":2}', None),
    "trailing-garbage": (chat()[0] + b"}}}", None),
    # numbers
    "max_tokens-2**63": chat("max_tokens", max_tokens=2**63),
    "max_tokens-2**64": chat("max_tokens", max_tokens=2**64),
    "max_tokens-1e308": chat("max_tokens", raw='"max_tokens": 1e308'),
    "max_tokens-1e999": chat("max_tokens", raw='"max_tokens": 1e999'),
    "max_tokens-NaN": chat("max_tokens", raw='"max_tokens": NaN'),
    "max_tokens-negative": chat("max_tokens", max_tokens=-1),
    "max_tokens-zero": chat("max_tokens", max_tokens=0),
    "max_completion_tokens-huge": chat("max_completion_tokens", max_completion_tokens=10**30),
    # regression: Infinity passed validation, went to the engine as null and killed it
    "temperature-Infinity": chat("temperature", raw='"temperature": Infinity'),
    "temperature--Infinity": chat("temperature", raw='"temperature": -Infinity'),
    "temperature-NaN": chat("temperature", raw='"temperature": NaN'),
    "temperature-1e999": chat("temperature", raw='"temperature": 1e999'),
    "temperature-string-Infinity": chat("temperature", temperature="Infinity"),
    "top_p-string-nan": chat("top_p", top_p="nan"),
    "min_p-Infinity": chat("min_p", raw='"min_p": Infinity'),
    "repetition_penalty-Infinity": chat("repetition_penalty", raw='"repetition_penalty": Infinity'),
    "frequency_penalty-NaN": chat("frequency_penalty", raw='"frequency_penalty": NaN'),
    "presence_penalty--Infinity": chat("presence_penalty", raw='"presence_penalty": -Infinity'),
    "temperature-tiny": chat(None, temperature=5e-324),
    "repetition_penalty-tiny": chat(None, repetition_penalty=5e-324),
    "temperature-huge": chat(None, temperature=1e308),
    "n-huge": chat("n", n=10**9),
    "n-2**63": chat("n", n=2**63),
    "n-zero": chat("n", n=0),
    "n-negative": chat("n", n=-3),
    "n-float": chat("n", n=2.5),
    "top_logprobs-huge": chat("top_logprobs", logprobs=True, top_logprobs=10**9),
    "top_logprobs-negative": chat("top_logprobs", logprobs=True, top_logprobs=-1),
    "top_logprobs-without-logprobs": chat("top_logprobs", top_logprobs=3),
    # regression: seeds past 64 bits reached the engine codec (500 TypeError)
    "seed-2**64": chat("seed", seed=2**64),
    "seed--2**64": chat("seed", seed=-(2**64)),
    "seed-2**63": chat("seed", seed=2**63),
    "seed-int64-max-n-3": chat(None, seed=2**63 - 1, n=3),
    "seed-int64-min": chat(None, seed=-(2**63)),
    # regression: as for seeds
    "top_k-2**64": chat("top_k", top_k=2**64),
    "top_k-int64-max": chat(None, top_k=2**63 - 1),
    "stop_token_ids-2**70": chat("stop_token_ids", stop_token_ids=[2**70]),
    "stop_token_ids-negative": chat("stop_token_ids", stop_token_ids=[-5]),
    # types
    "model-null": chat("model", model=None),
    "model-number": chat("model", model=7),
    "model-unknown": chat("model", model="gpt-4"),
    "messages-null": chat("messages", messages=None),
    "messages-object": chat("messages", messages={"role": "user"}),
    "messages-empty": chat("messages", messages=[]),
    "message-not-object": chat("messages", messages=["hi"]),
    "role-tool": chat("messages", messages=[{"role": "tool", "content": "x"}]),
    "role-missing": chat("messages", messages=[{"content": "x"}]),
    "role-null": chat("messages", messages=[{"role": None, "content": "x"}]),
    "content-object": chat("messages", messages=[{"role": "user", "content": {"a": 1}}]),
    "content-part-image": chat("messages", messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]),
    "content-part-no-text": chat("messages", messages=[{"role": "user", "content": [{"type": "text"}]}]),
    "content-part-no-type": chat("messages", messages=[{"role": "user", "content": [{"text": "x"}]}]),
    "content-part-number": chat("messages", messages=[{"role": "user", "content": [1]}]),
    "content-empty-parts": chat(None, messages=[{"role": "user", "content": []}]),
    "content-null": chat(None, messages=[{"role": "user", "content": None}]),
    "stream-string": chat("stream", stream="yes"),
    "stream_options-without-stream": chat("stream_options", stream_options={"include_usage": True}),
    "stream_options-wrong": chat("stream_options", stream=True, stream_options={"include_usage": "maybe"}),
    "logit_bias-set": chat("logit_bias", logit_bias={"1": 5}),
    "tools-set": chat("tools", tools=[{"type": "function"}]),
    "user-object": chat("user", user={"id": 1}),
    "stop-number": chat("stop", stop=5),
    "stop-empty-string": chat("stop", stop=[""]),
    "stop-10000-strings": chat(None, stop=[f"s{i}" for i in range(10000)]),
    "pd-from-a-client": chat("pd", pd={"room": 1, "prefill": "p", "decode": "d"}),
    "pd-negative-room": chat("pd", pd={"room": -1, "prefill": "p", "decode": "d"}),
    "unknown-fields": chat(None, foo=1, bar={"x": [1, 2]}, metadata={"k": "v"}),
    "null-everywhere": (encode({k: None for k in (
        "model", "messages", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream", "logprobs",
        "top_logprobs", "user", "tools", "logit_bias", "stream_options", "max_completion_tokens")}), None),
    # regression: a JSON \ud800 escape is a lone surrogate; the tokenizer raised TypeError (500)
    "content-lone-surrogate": chat("messages", messages=[{"role": "user", "content": "a\ud800"}]),
    "text-part-lone-surrogate": chat("messages", messages=[{"role": "user", "content": [
        {"type": "text", "text": "\udfff"}]}]),
    "model-lone-surrogate": chat("model", model="\ud800"),
    "stop-lone-surrogate": chat("stop", stop=["\ud800"]),
    "content-nul-and-controls": chat(None, messages=[{"role": "user", "content": "\x00\x01\u202e\ufeff"}]),
}

_COMPLETION_CASES: dict[str, tuple[bytes, str | None]] = {
    "prompt-empty-list": completion("prompt", prompt=[]),
    "prompt-empty-string": completion("prompt", prompt=""),
    "prompt-empty-ids": completion("prompt", prompt=[[]]),
    "prompt-id-2**64": completion("prompt", prompt=[2**64]),
    "prompt-id-negative": completion("prompt", prompt=[-1]),
    "prompt-mixed-list": completion("prompt", prompt=[1, "a"]),
    "prompt-nested-ids-huge": completion("prompt", prompt=[[1], [2**63]]),
    "prompt-object": completion("prompt", prompt={"a": 1}),
    "prompt-lone-surrogate": completion("prompt", prompt=["ok", "\ud800"]),
    "prompt-too-long": completion("prompt", prompt="hi " * 5000),
    # regression: 2000 prompts x n=128 asked for more engine requests than the node ever admits:
    # a 503 with Retry-After, which no retry could ever pass
    "prompts-times-n-over-the-limit": completion("n", prompt=["a"] * 2000, n=128),
    # regression: the limit was checked after tokenizing every prompt: 200000 one-letter prompts
    # (1.2 MB) kept the node's tokenizer thread busy for minutes
    "prompts-200000": completion("n", prompt=["a"] * 200_000),
    "logprobs-huge": completion("logprobs", logprobs=10**9),
    "logprobs-bool": completion(None, logprobs=True),
    "echo-set": completion("echo", echo=True),
    "suffix-set": completion("suffix", suffix="x"),
    "suffix-number": completion("suffix", suffix=5),
}

CASES: list[Case] = [Case(k, CHAT, b, JSON, f) for k, (b, f) in _CHAT_CASES.items()] + [
    Case(k, COMPLETIONS, b, JSON, f) for k, (b, f) in _COMPLETION_CASES.items()
] + [
    Case("wrong-content-type", CHAT, chat()[0], {"content-type": "text/plain"}, None),
    Case("no-content-type", CHAT, chat()[0], {}, None),
    Case("form-content-type", CHAT, b"model=demo&messages=hi", {"content-type": "application/x-www-form-urlencoded"}, None),
    Case("json-charset-latin1", CHAT, chat()[0], {"content-type": "application/json; charset=latin-1"}, None),
    Case("oversized-body", CHAT, encode({"model": MODEL, "messages": [{"role": "user", "content": "x" * (5 << 20)}]}),
         JSON, None),
]


def valid_chat_bytes() -> bytes:
    return json.dumps({"model": MODEL, "messages": MSG, "max_tokens": 2}).encode()


def raw_requests(port: int) -> dict[str, tuple[bytes, bool]]:
    """Raw HTTP/1.1 requests: (bytes, close right after sending)."""
    body = valid_chat_bytes()
    host = f"Host: 127.0.0.1:{port}\r\n".encode()
    head = b"POST " + CHAT.encode() + b" HTTP/1.1\r\n" + host + b"Content-Type: application/json\r\n"

    def chunked(parts: list[bytes], size_line: bytes | None = None) -> bytes:
        out = b""
        for p in parts:
            out += (size_line or f"{len(p):x}".encode()) + b"\r\n" + p + b"\r\n"
        return out + b"0\r\n\r\n"

    third = len(body) // 3
    pieces = [body[:third], body[third:2 * third], body[2 * third:]]
    return {
        "chunked-body": (head + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunked(pieces), False),
        "chunked-1-byte-chunks": (head + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                                  + chunked([body[i:i + 1] for i in range(len(body))]), False),
        "chunked-bad-size": (head + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                             + chunked(pieces, size_line=b"zz"), False),
        "chunked-and-content-length": (head + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n"
                                       b"Connection: close\r\n\r\n" + chunked(pieces), False),
        "content-length-not-a-number": (head + b"Content-Length: abc\r\nConnection: close\r\n\r\n" + body, False),
        "content-length-negative": (head + b"Content-Length: -5\r\nConnection: close\r\n\r\n" + body, False),
        "content-length-short": (head + b"Content-Length: 10\r\nConnection: close\r\n\r\n" + body, False),
        "content-length-long-then-hang-up": (head + f"Content-Length: {len(body) + 100}\r\n\r\n".encode() + body, True),
        "content-length-huge-then-hang-up": (head + b"Content-Length: 99999999999999999999\r\n\r\n" + body, True),
        "header-100k": (head + b"X-Big: " + b"a" * 100_000 + b"\r\nConnection: close\r\n"
                        + f"Content-Length: {len(body)}\r\n\r\n".encode() + body, False),
        "bad-request-line": (b"BREW /v1/chat/completions HTCPCP/1.0\r\n\r\n", False),
        "not-http": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64, False),
        "headers-only-then-hang-up": (head + f"Content-Length: {len(body)}\r\n\r\n".encode(), True),
    }


# Sent again over HTTP/2 (h2c with prior knowledge): Granian's other protocol path into the same apps.
# Not the oversized body: the server answers 413 and ends the stream while the client still sends,
# which httpx's h2 client reports as its own protocol error.
H2_CASE_IDS = frozenset({
    "deep-array-100000", "invalid-utf8", "not-json", "empty", "temperature-Infinity", "seed-2**64",
    "content-lone-surrogate", "null-everywhere", "stop-10000-strings", "prompts-times-n-over-the-limit",
    "wrong-content-type", "prompt-id-2**64",
})
H2_CASES = [c for c in CASES if c.id in H2_CASE_IDS]
