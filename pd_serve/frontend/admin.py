"""The frontend's routes about its nodes rather than a generation: `/health`, `/v1/models` and
`/flush_cache`, and the `httpx` client they (and the static node watcher) share.

- `health`: 200 while a compatible (prefill, decode) pair is live, or with no prefill node a decode
  node; 503 with Retry-After otherwise.
- `models`: the first live node's `/v1/models`, relayed.
- `flush_cache`: fanned out to every node; 502 unless every node answered 200.

Never relays a generation: that is `proxy.Relay`'s.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import orjson

from pd_serve.frontend.config import FrontendConfig
from pd_serve.frontend.downstream import reply
from pd_serve.frontend.errors import RETRY_AFTER_S, error_bytes
from pd_serve.frontend.nodes import NodeSet
from pd_serve.http_common import Send
from pd_serve.openai_errors import ErrorCode


def upstream_client(config: FrontendConfig) -> httpx.AsyncClient:
    """The one pool every upstream call shares: keep-alive, every wait bounded."""
    timeout = httpx.Timeout(
        config.upstream_timeout, connect=config.connect_timeout, pool=config.connect_timeout
    )
    limits = httpx.Limits(max_connections=4096, max_keepalive_connections=512, keepalive_expiry=30.0)
    return httpx.AsyncClient(timeout=timeout, limits=limits, verify=False)


async def health(nodes: NodeSet, send: Send) -> None:
    pairs = nodes.has_pair()
    decodes = [n for n in nodes.of_role("decode", "colocated") if nodes.available(n)]
    prefills = nodes.of_role("prefill")
    ok = pairs or (bool(decodes) and not prefills)
    body = {
        "status": "ok" if ok else "no compatible node pair",
        "pairs": pairs,
        "prefill": len(prefills),
        "decode": len(nodes.of_role("decode", "colocated")),
    }
    headers = () if ok else ((b"retry-after", RETRY_AFTER_S.encode()),)
    await reply(send, 200 if ok else 503, orjson.dumps(body), headers)


async def models(nodes: NodeSet, http: httpx.AsyncClient, headers: dict[str, str], send: Send) -> None:
    for node in nodes.of_role("decode", "colocated") + nodes.of_role("prefill"):
        if not nodes.available(node):
            continue
        try:
            r = await http.get(f"{node.url}/v1/models", headers=headers, timeout=5.0)
        except httpx.HTTPError:
            continue
        if r.status_code == 200:
            await reply(send, 200, r.content)
            return
    await reply(
        send,
        503,
        error_bytes(503, "no live node answered /v1/models", code=ErrorCode.NO_NODE),
        ((b"retry-after", RETRY_AFTER_S.encode()),),
    )


async def flush_cache(nodes: NodeSet, http: httpx.AsyncClient, headers: dict[str, str], send: Send) -> None:
    every = list(nodes.nodes.values())

    async def one(url: str) -> dict[str, Any]:
        try:
            r = await http.post(f"{url}/flush_cache", headers=headers, timeout=30.0)
        except httpx.HTTPError as exc:
            return {"status": 0, "error": type(exc).__name__}
        try:
            return {"status": r.status_code, "body": r.json()}
        except ValueError:
            return {"status": r.status_code, "body": r.text[:200]}

    results = await asyncio.gather(*(one(n.url) for n in every))
    by_node = {n.node_id: res for n, res in zip(every, results)}
    ok = all(res["status"] == 200 for res in results)
    await reply(send, 200 if ok else 502, orjson.dumps({"nodes": by_node}))
