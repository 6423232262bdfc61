"""The bootstrap client used by nodes and the frontend (asyncio + httpx); the wire shapes are in `app.py`.

    from pd_serve.bootstrap.records import NodeRegistration, Load   # the typed bodies (pydantic)
    client = BootstrapClient("http://127.0.0.1:8998")          # token=None reads $PD_SERVE_CLUSTER_TOKEN,
                                                               # token="" sends none
    record = await client.register("decode-0", registration)   # NodeRegistration -> NodeRecord; retries
    record = await client.heartbeat("decode-0", Load(...))     # raises NodeExpired on 404
    await client.leave("decode-0")                             # -> bool (False: was not there)
    await client.get_node(node_id)                             # -> NodeRecord | None
    await client.list_nodes(role="prefill")                    # -> NodeList(nodes, etag)
    await client.wait_for_change(etag, role, timeout=30)       # long-poll -> NodeList
    async for listing in client.watch(role="prefill"): ...     # the current list, then every change
    await client.check_pair(prefill_id, decode_id)             # -> PairCheck(compatible, field, ...)
    await client.aclose()                                      # or `async with BootstrapClient(...)`

    keeper = NodeKeeper(client, "decode-0", registration, load_fn=lambda: Load(...))
    await keeper.start()   # registers (with retries), then heartbeats every ttl/3 in a task; after a 404
                           # (the service restarted or the node expired) it registers again
    await keeper.stop()    # stops the task and leaves (DELETE)

    peers = PeerCache(client, max_age=30)
    record = await peers.get("prefill-0")   # fetched once, then served from the cache until max_age
    peers.invalidate("prefill-0")           # after a transfer failure; `await peers.follow(role)` keeps
                                            # the cache in step with joins and leaves through watch()

Errors: `BootstrapError(status, detail)`, with `NodeExpired` (404 on a heartbeat), `NodeNotFound`
(404 on a lookup) and `Unauthorized` (401). Every call is bounded by `timeout`; only `register`,
`watch` and the keeper retry, with the `RetryPolicy` backoff. The token is never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import httpx

from pd_serve.bootstrap.config import read_token
from pd_serve.bootstrap.errors import (
    BootstrapError,
    NodeExpired,
    NodeNotFound,
    RetryPolicy,
    Unauthorized,
    retryable,
)
from pd_serve.bootstrap.records import Load, NodeList, NodeRecord, NodeRegistration, PairCheck, Role

__all__ = [
    "BootstrapClient",
    "BootstrapError",
    "NodeExpired",
    "NodeKeeper",
    "NodeNotFound",
    "PeerCache",
    "RetryPolicy",
    "Unauthorized",
]

log = logging.getLogger("pd_serve.bootstrap.client")
T = TypeVar("T")


class BootstrapClient:
    """One connection pool to one bootstrap service; see the module docstring for the API."""

    def __init__(
        self, url: str, token: str | None = None, timeout: float = 5.0, retry: RetryPolicy | None = None
    ) -> None:
        token = token if token is not None else read_token()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self._http = httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    async def __aenter__(self) -> BootstrapClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> httpx.Response:
        try:
            response = await self._http.request(
                method, path, json=json, params=params, timeout=timeout or self.timeout
            )
        except httpx.TransportError as exc:
            raise BootstrapError(0, f"{type(exc).__name__} calling {method} {path}") from exc
        if response.status_code >= 400:
            raise _error(response)
        return response

    async def register(self, node_id: str, registration: NodeRegistration) -> NodeRecord:
        """PUT the node, retrying unreachable/5xx answers with backoff; 4xx errors raise at once."""
        body = registration.model_dump(mode="json")
        return await self._retrying(lambda: self._put(node_id, body))

    async def _put(self, node_id: str, body: dict[str, Any]) -> NodeRecord:
        response = await self._call("PUT", f"/v1/nodes/{node_id}", json=body)
        return NodeRecord.model_validate_json(response.content)

    async def _retrying(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """`attempt()` up to retry.attempts times; the last failure (or a non-retryable one) raises."""
        for delay in itertools.islice(self.retry.delays(), self.retry.attempts - 1):
            try:
                return await attempt()
            except BootstrapError as exc:
                if not retryable(exc):
                    raise
            await asyncio.sleep(delay)
        return await attempt()

    async def heartbeat(self, node_id: str, load: Load | None = None) -> NodeRecord:
        body = {"load": load.model_dump()} if load is not None else None
        try:
            response = await self._call("POST", f"/v1/nodes/{node_id}/heartbeat", json=body)
        except NodeNotFound as exc:
            raise NodeExpired(404, exc.detail) from None
        return NodeRecord.model_validate_json(response.content)

    async def leave(self, node_id: str) -> bool:
        try:
            await self._call("DELETE", f"/v1/nodes/{node_id}")
        except NodeNotFound:
            return False
        return True

    async def get_node(self, node_id: str) -> NodeRecord | None:
        try:
            response = await self._call("GET", f"/v1/nodes/{node_id}")
        except NodeNotFound:
            return None
        return NodeRecord.model_validate_json(response.content)

    async def list_nodes(self, role: Role | None = None) -> NodeList:
        response = await self._call("GET", "/v1/nodes", params=_role(role))
        return NodeList.model_validate_json(response.content)

    async def wait_for_change(self, etag: str, role: Role | None = None, timeout: float = 30.0) -> NodeList:
        params = {**_role(role), "wait": etag, "timeout": timeout}
        response = await self._call("GET", "/v1/nodes", params=params, timeout=timeout + self.timeout)
        return NodeList.model_validate_json(response.content)

    async def watch(self, role: Role | None = None, timeout: float = 30.0) -> AsyncIterator[NodeList]:
        """Yield the current list, then each changed one; outages are retried with backoff, forever."""
        etag: str | None = None
        delays = self.retry.delays()
        while True:
            try:
                listing = await (
                    self.list_nodes(role) if etag is None else self.wait_for_change(etag, role, timeout)
                )
            except BootstrapError as exc:
                if not retryable(exc):
                    raise
                await asyncio.sleep(next(delays))
                continue
            delays = self.retry.delays()
            if listing.etag != etag:
                etag = listing.etag
                yield listing

    async def check_pair(self, prefill: str, decode: str) -> PairCheck:
        response = await self._call("GET", "/v1/pairs/check", params={"prefill": prefill, "decode": decode})
        return PairCheck.model_validate_json(response.content)


def _role(role: Role | None) -> dict[str, Any]:
    return {"role": role} if role is not None else {}


def _error(response: httpx.Response) -> BootstrapError:
    try:
        detail = str(response.json().get("detail", response.text))
    except ValueError:
        detail = response.text[:200]
    kind = {401: Unauthorized, 404: NodeNotFound}.get(response.status_code, BootstrapError)
    return kind(response.status_code, detail)


class NodeKeeper:
    """Keeps one node registered: register, then heartbeat every ttl/3, re-registering after a 404."""

    def __init__(
        self,
        client: BootstrapClient,
        node_id: str,
        registration: NodeRegistration,
        load_fn: Callable[[], Load] | None = None,
        interval: float | None = None,
    ) -> None:
        self.client = client
        self.node_id = node_id
        self.registration = registration
        self.load_fn = load_fn
        self.interval = interval
        self.registrations = 0  # how many times it has registered (1 + re-registrations)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> NodeRecord:
        record = await self._register()
        self._task = asyncio.create_task(
            self._beat_forever(record), name=f"bootstrap-heartbeat-{self.node_id}"
        )
        return record

    async def stop(self, leave: bool = True) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if leave:
            with contextlib.suppress(BootstrapError):
                await self.client.leave(self.node_id)

    async def _register(self) -> NodeRecord:
        registration = self.registration
        if self.load_fn is not None:
            registration = registration.model_copy(update={"load": self.load_fn()})
        record = await self.client.register(self.node_id, registration)
        self.registrations += 1
        return record

    async def _beat_forever(self, record: NodeRecord) -> None:
        period = max(0.05, min(self.interval or record.ttl / 3, record.ttl / 3))  # never slower than ttl/3
        reachable = True
        while True:
            await asyncio.sleep(period)
            try:
                await self._beat_once()
            except BootstrapError as exc:
                if reachable:  # one warning per outage, not one per beat
                    log.warning(
                        "node %s: heartbeat failed (%s); retrying every %.2fs", self.node_id, exc, period
                    )
                reachable = False
                continue
            reachable = True

    async def _beat_once(self) -> None:
        load = self.load_fn() if self.load_fn is not None else None
        try:
            await self.client.heartbeat(self.node_id, load)
        except NodeExpired:
            log.info("node %s: bootstrap forgot it (expired or restarted); registering again", self.node_id)
            await self._register()


class PeerCache:
    """Node-side cache of peer records (for transfer endpoints), refreshed after `max_age` seconds."""

    def __init__(self, client: BootstrapClient, max_age: float = 30.0) -> None:
        self.client = client
        self.max_age = max_age
        self._entries: dict[str, tuple[float, NodeRecord]] = {}

    async def get(self, node_id: str) -> NodeRecord:
        """The cached record, or a fresh one; raises NodeNotFound when the service does not know it."""
        entry = self._entries.get(node_id)
        if entry is not None and time.monotonic() - entry[0] < self.max_age:
            return entry[1]
        record = await self.client.get_node(node_id)
        if record is None:
            self._entries.pop(node_id, None)
            raise NodeNotFound(404, f"node {node_id!r} is unknown or expired")
        self._entries[node_id] = (time.monotonic(), record)
        return record

    def cached(self, node_id: str) -> NodeRecord | None:
        entry = self._entries.get(node_id)
        return entry[1] if entry is not None else None

    def invalidate(self, node_id: str) -> None:
        self._entries.pop(node_id, None)

    def replace_all(self, listing: NodeList) -> None:
        now = time.monotonic()
        self._entries = {r.node_id: (now, r) for r in listing.nodes}

    async def follow(self, role: Role | None = None) -> None:
        """Mirror the service's list (joins, leaves, re-registrations) until cancelled."""
        async for listing in self.client.watch(role):
            self.replace_all(listing)
