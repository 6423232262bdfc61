"""Where a decode node finds a prefill node's transfer endpoint without the bootstrap registry: SGLang's
`bootstrap_host:bootstrap_port` (sent by smg) and our own `pd.prefill_url` (the frontend's static mode).

- prefill side: `bootstrap_info` is what it answers at `BOOTSTRAP_ROUTE`, on its HTTP port and, with
  `--bootstrap-port`, on a `BootstrapListener` of its own (plain HTTP/1.1, GET only, cluster token).
- decode side: `PrefillDirectory.lookup` fetches that answer once per prefill address (with a
  timeout), checks the KV layout and caches the endpoint; `invalidate` drops it when the endpoint
  refused a connection (a restarted prefill node listens on a new transfer port).

It must never answer without the cluster token when the node has one, nor block the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, NamedTuple

import httpx
import orjson

from pd_serve.cluster_token import CLUSTER_TOKEN_HEADER
from pd_serve.http_common import token_ok
from pd_serve.kv_layout import KVLayout, LayoutError
from pd_serve.openai_errors import ErrorCode
from pd_serve.server.state import NodeState

log = logging.getLogger(__name__)
BOOTSTRAP_ROUTE = "/pd_bootstrap"
LOOKUP_TIMEOUT_S = 5.0
_HEAD_LIMIT = 16 * 1024  # bytes of request line and headers the listener reads
_HEAD_TIMEOUT_S = 5.0


def bootstrap_info(state: NodeState) -> dict[str, Any]:
    """What a decode node needs to reach this node's transfer endpoint, and to check it can pair."""
    info = state.info
    assert info is not None  # the app answers only once started
    return {
        "role": state.backend.role,
        "transfer_endpoint": info.transfer_endpoint,
        "transfer_backend": info.transfer_backend,
        "layout": info.layout.to_dict(),
    }


class PeerLookup(NamedTuple):
    """A prefill node's transfer endpoint, or None and why not: the refusal's message, its error param
    ("pd": a bad request) and code (prefill_unreachable: the caller retries elsewhere)."""

    endpoint: str | None
    problem: str = ""
    param: str | None = None
    code: str | None = None


class PrefillDirectory:
    """The decode node's cache of prefill addresses (an http URL) -> transfer endpoint."""

    def __init__(self, token: str | None, timeout: float = LOOKUP_TIMEOUT_S) -> None:
        headers = {CLUSTER_TOKEN_HEADER: token} if token else {}
        self._http = httpx.AsyncClient(timeout=timeout, headers=headers)
        self._endpoints: dict[str, str] = {}

    async def aclose(self) -> None:
        await self._http.aclose()

    def invalidate(self, url: str) -> None:
        self._endpoints.pop(url.rstrip("/"), None)

    async def lookup(self, url: str, mine: KVLayout) -> PeerLookup:
        url = url.rstrip("/")
        cached = self._endpoints.get(url)
        if cached is not None:
            return PeerLookup(cached)
        try:
            r = await self._http.get(url + BOOTSTRAP_ROUTE)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            return PeerLookup(
                None,
                f"prefill node {url}: {BOOTSTRAP_ROUTE} failed: {exc!r}",
                None,
                ErrorCode.PREFILL_UNREACHABLE,
            )
        if r.status_code != 200:
            problem = f"prefill node {url}: {BOOTSTRAP_ROUTE} answered {r.status_code}: {r.text[:300]}"
            return PeerLookup(None, problem, None, ErrorCode.PREFILL_UNREACHABLE)
        found = _endpoint_of(url, r.content, mine)
        if found.endpoint is not None:
            self._endpoints[url] = found.endpoint
        return found


def _endpoint_of(url: str, body: bytes, mine: KVLayout) -> PeerLookup:
    try:
        answer = orjson.loads(body)
        theirs = KVLayout.from_value(answer["layout"])
    except (ValueError, KeyError, TypeError, LayoutError) as exc:
        return PeerLookup(
            None,
            f"prefill node {url}: unreadable {BOOTSTRAP_ROUTE} answer ({exc})",
            None,
            ErrorCode.PREFILL_UNREACHABLE,
        )
    if answer.get("role") != "prefill" or not answer.get("transfer_endpoint"):
        return PeerLookup(None, f"{url} is a {answer.get('role')} node, not a prefill node", "pd")
    diff = mine.difference(theirs)
    if diff is not None:
        problem = f"incompatible KV layout: {diff.field} is {diff.theirs!r} on {url} and {diff.mine!r} here"
        return PeerLookup(None, problem, "pd")
    return PeerLookup(str(answer["transfer_endpoint"]))


class BootstrapListener:
    """A prefill node's `--bootstrap-port`: answers `GET BOOTSTRAP_ROUTE` and nothing else."""

    def __init__(self, state: NodeState, host: str, port: int) -> None:
        self._state = state
        self._host = host
        self._port = port
        self._token = state.config.cluster_token.encode() if state.config.cluster_token else None
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self._host, self._port)
        log.info("bootstrap port %s:%d answers %s", self._host, self._port, BOOTSTRAP_ROUTE)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _HEAD_TIMEOUT_S)
            status, body = self._answer(head)
        except (
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            asyncio.TimeoutError,
            ConnectionError,
        ):
            status, body = 400, {"error": "a GET request with its headers, under 16 KiB"}
        with contextlib.suppress(ConnectionError):
            payload = orjson.dumps(body)
            writer.write(
                f"HTTP/1.1 {status} {_REASONS[status]}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(payload)}\r\nconnection: close\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
        writer.close()

    def _answer(self, head: bytes) -> tuple[int, dict[str, Any]]:
        lines = head[:_HEAD_LIMIT].split(b"\r\n")
        method, _, rest = lines[0].partition(b" ")
        path = rest.partition(b" ")[0].partition(b"?")[0]
        if method != b"GET" or path != BOOTSTRAP_ROUTE.encode():
            return 404, {"error": f"this port serves only GET {BOOTSTRAP_ROUTE}"}
        headers = dict(_header(line) for line in lines[1:] if b":" in line)
        bearer = headers.get(b"authorization", b"")
        given = headers.get(CLUSTER_TOKEN_HEADER.encode()) or (
            bearer[7:] if bearer[:7].lower() == b"bearer " else None
        )
        if not token_ok(given, self._token):
            return 401, {
                "error": f"send the cluster token in {CLUSTER_TOKEN_HEADER} or Authorization: Bearer"
            }
        if not self._state.backend.alive:
            return 503, {"error": "the engine is not alive"}
        return 200, bootstrap_info(self._state)


def _header(line: bytes) -> tuple[bytes, bytes]:
    name, _, value = line.partition(b":")
    return name.strip().lower(), value.strip()


_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 503: "Service Unavailable"}


async def start_bootstrap_listener(state: NodeState) -> BootstrapListener | None:
    """The prefill node's own bootstrap port, when `--bootstrap-port` differs from its HTTP port."""
    port = state.config.bootstrap_port
    if state.backend.role != "prefill" or port is None or port == state.config.port:
        return None
    listener = BootstrapListener(state, state.config.host, port)
    await listener.start()
    return listener
