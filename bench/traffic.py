"""Chat traffic for chaos tests and the soak: concurrent clients, streaming and not, some leaving early.

`chat(client, url, ...)` sends one `/v1/chat/completions` request and classifies how it ended:
- `ok`: a non-streamed 200 with a choice, or a stream that ended with `data: [DONE]` after a finish;
- `cancelled`: this client disconnected on purpose (`disconnect_after` chunks into a stream);
- `error:<code>`: a clean failure: an OpenAI-shaped error body (any status), or a stream that ended
  with an error event (`code` is the error's code, or its HTTP status);
- `broken:<why>`: anything else: a body that is not an OpenAI error, a stream cut without an error
  event or [DONE], a connection reset by the frontend;
- `hang`: no answer within `timeout` seconds (httpx's read timeout, and an overall deadline).

`Traffic` runs `clients` threads, each sending requests back to back until `stop()`, and counts the
outcomes. Standard library plus httpx.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

WORDS = [
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo",
    "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango", "uniform",
    "victor", "whiskey", "xray", "yankee", "zulu", "the", "of", "and", "to", "in", "is", "it", "that",
]  # fmt: skip


@dataclass
class Outcome:
    kind: str  # ok | cancelled | error:<code> | broken:<why> | hang
    text: str = ""
    seconds: float = 0.0
    stream: bool = False


def prompt(rng: random.Random, min_words: int, max_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words)))


def chat_body(content: str, max_tokens: int, stream: bool, greedy: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "demo",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "stream": stream,
        "ignore_eos": True,
    }
    if greedy:
        body["temperature"] = 0
    return body


def _error_kind(payload: Any, status: int) -> str | None:
    """'error:<code>' for an OpenAI-shaped error object, else None."""
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        err = payload["error"]
        if isinstance(err.get("message"), str):
            return f"error:{err.get('code') or err.get('type') or status}"
    return None


def chat(
    client: httpx.Client,
    url: str,
    body: dict[str, Any],
    timeout: float,
    disconnect_after: int | None = None,
    headers: dict[str, str] | None = None,
) -> Outcome:
    t0 = time.monotonic()
    stream = bool(body.get("stream"))
    try:
        if stream:
            out = _stream(client, url, body, timeout, disconnect_after, headers)
        else:
            r = client.post(f"{url}/v1/chat/completions", json=body, timeout=timeout, headers=headers)
            out = _whole(r)
    except httpx.TimeoutException:
        out = Outcome("hang")
    except httpx.TransportError as exc:
        out = Outcome(f"broken:{type(exc).__name__}")
    out.seconds, out.stream = time.monotonic() - t0, stream
    return out


def _whole(r: httpx.Response) -> Outcome:
    try:
        payload = r.json()
    except ValueError:
        return Outcome(f"broken:non-JSON body, status {r.status_code}")
    if r.status_code == 200 and isinstance(payload, dict) and payload.get("choices"):
        choice = payload["choices"][0]
        if choice.get("finish_reason") in ("stop", "length"):
            return Outcome("ok", choice["message"]["content"] or "")
        return Outcome(f"error:finish_reason {choice.get('finish_reason')}")
    return Outcome(
        _error_kind(payload, r.status_code) or f"broken:status {r.status_code}, not an OpenAI error"
    )


def _stream(
    client: httpx.Client,
    url: str,
    body: dict[str, Any],
    timeout: float,
    disconnect_after: int | None,
    headers: dict[str, str] | None,
) -> Outcome:
    deadline = time.monotonic() + timeout
    with client.stream(
        "POST", f"{url}/v1/chat/completions", json=body, timeout=timeout, headers=headers
    ) as r:
        if r.status_code != 200:
            r.read()
            return _whole(r)
        text, finish, chunks = [], None, 0
        for line in r.iter_lines():
            if time.monotonic() > deadline:
                return Outcome("hang")
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                if finish in ("stop", "length"):
                    return Outcome("ok", "".join(text))
                return Outcome(
                    f"error:finish_reason {finish}" if finish else "broken:[DONE] without a finish"
                )
            event = json.loads(data)
            kind = _error_kind(event, 200)
            if kind is not None:
                return Outcome(kind)
            for choice in event.get("choices", []):
                text.append((choice.get("delta") or {}).get("content") or "")
                finish = choice.get("finish_reason") or finish
            chunks += 1
            if disconnect_after is not None and chunks >= disconnect_after:
                return Outcome("cancelled")  # leaving the block closes the connection
        return Outcome("broken:stream ended without [DONE] or an error event")


@dataclass
class TrafficConfig:
    clients: int = 4
    stream_share: float = 0.5
    disconnect_share: float = 0.0  # of clients' requests: leave a stream (or a request) early
    min_words: int = 4
    max_words: int = 60
    max_tokens: tuple[int, int] = (4, 16)
    timeout: float = 60.0
    seed: int = 0
    headers: dict[str, str] = field(default_factory=dict)


class Traffic:
    def __init__(self, url: str, config: TrafficConfig) -> None:
        self.url, self.config = url, config
        self.outcomes: Counter[str] = Counter()
        self.examples: dict[str, str] = {}
        self.latencies: list[float] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, args=(i,), name=f"traffic-{i}", daemon=True)
            for i in range(config.clients)
        ]

    def start(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout: float | None = None) -> Counter[str]:
        """Stop sending; wait for the requests in flight (each ends by its own timeout)."""
        self._stop.set()
        limit = self.config.timeout + 15 if timeout is None else timeout
        deadline = time.monotonic() + limit
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            self.record(Outcome("hang"), f"client threads still running after {limit:.0f} s: {alive}")
        return self.outcomes

    def __enter__(self) -> Traffic:
        return self  # started already (`Traffic(...).start()`)

    def __exit__(self, *exc: object) -> None:
        self.stop()  # also when the block failed: no client may outlive it

    def record(self, out: Outcome, example: str = "") -> None:
        with self._lock:
            self.outcomes[out.kind] += 1
            self.examples.setdefault(out.kind, example or out.text[:80])
            if out.kind == "ok":
                self.latencies.append(out.seconds)

    def _client(self, index: int) -> None:
        c = self.config
        rng = random.Random(c.seed * 1000 + index)
        with httpx.Client(headers=c.headers) as client:
            while not self._stop.is_set():
                stream = rng.random() < c.stream_share
                leave = rng.random() < c.disconnect_share
                body = chat_body(prompt(rng, c.min_words, c.max_words), rng.randint(*c.max_tokens), stream)
                if leave and not stream:
                    out = self._abandon(client, body, rng.uniform(0.0, 0.5))
                else:
                    after = rng.randint(1, max(1, body["max_tokens"] - 1)) if leave else None
                    out = chat(client, self.url, body, c.timeout, after)
                self.record(out)

    def _abandon(self, client: httpx.Client, body: dict[str, Any], after_s: float) -> Outcome:
        """A non-streamed request whose client gives up after `after_s` seconds."""
        out = chat(client, self.url, body, after_s)
        return Outcome("cancelled") if out.kind == "hang" else out
