"""The frontend's view of the nodes: who is live, in which role, with which KV layout, and how loaded.

`NodeSet` holds immutable `Node` snapshots plus, per node, a circuit breaker; the `LoadTracker` counts
this frontend's requests in flight. Two sources keep it current, each one asyncio task:
- `watch_bootstrap`: a long-poll on `GET /v1/nodes` with a short timeout, so joins and expiries are
  seen as soon as the service reports them and the reported loads are at most `probe_interval` old.
- `watch_static`: for `--prefill/--decode URL` lists, a `/health` probe per node every
  `probe_interval`, and `/server_info` once a node answers (its role and layout). Node ids are the URLs.
A node is never paired with a node whose layout differs, or whose layout is unknown.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import httpx

from pd_serve.frontend.breaker import BreakerState, CircuitBreaker
from pd_serve.frontend.config import FrontendConfig
from pd_serve.frontend.load import LoadTracker
from pd_serve.kv_layout import KVLayout, LayoutError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Node:
    node_id: str
    role: str  # prefill | decode | colocated
    url: str  # base URL of its HTTP API, no trailing slash
    layout: KVLayout | None = None  # None: unknown
    tp_size: int | None = None  # number of transfer endpoints; None: unknown (static mode)
    reported_queue: int = 0  # running + waiting as the node last reported it
    reported_queued: int = 0  # of those, waiting for admission (a decode node: for free KV pages)

    @property
    def serves_decode(self) -> bool:
        return self.role in ("decode", "colocated")


def layout_key(layout: dict[str, Any] | None) -> KVLayout | None:
    """A node's KV layout from its wire form; None when unknown (absent or incomplete)."""
    if not isinstance(layout, dict) or not layout:
        return None
    try:
        return KVLayout.from_value(layout)
    except LayoutError:
        return None


def compatible(prefill: Node, decode: Node) -> bool:
    """Same layout (both known) and, where both are known, the same number of transfer endpoints."""
    if prefill.role != "prefill" or decode.role != "decode":
        return False
    if prefill.layout is None or decode.layout is None or prefill.layout.difference(decode.layout) is not None:
        return False
    return prefill.tp_size is None or decode.tp_size is None or prefill.tp_size == decode.tp_size


class NodeSet:
    def __init__(self, config: FrontendConfig) -> None:
        self.config = config
        self.nodes: dict[str, Node] = {}
        self.breakers: dict[str, CircuitBreaker] = {}
        self.load = LoadTracker(on_release=self._load_changed)
        self.changed = asyncio.Event()  # set on every membership change (tests and /health wait on it)
        self.load_listeners: list[Callable[[], None]] = []  # called when a node's load may have dropped
        self._active_at_report: dict[str, int] = {}  # our requests on a node when it reported a queue

    def replace_all(self, nodes: Iterable[Node]) -> None:
        fresh = {n.node_id: n for n in nodes}
        joined, left = fresh.keys() - self.nodes.keys(), self.nodes.keys() - fresh.keys()
        for node_id in left:
            self.breakers.pop(node_id, None)
        for node_id in joined:
            self.breakers[node_id] = self._breaker()
        if joined or left:
            log.info("nodes: %d live (joined %s, left %s)", len(fresh), sorted(joined), sorted(left))
            self.changed.set()
        for node_id, node in fresh.items():
            if node != self.nodes.get(node_id):  # a new report
                self._active_at_report[node_id] = self.load.active(node_id)
        for node_id in left:
            self._active_at_report.pop(node_id, None)
        self.nodes = fresh
        self._load_changed()

    def full(self, node: Node) -> bool:
        """The node reported requests queued for admission, and none of ours there ended since."""
        return node.reported_queued > 0 and self.load.active(node.node_id) >= self._active_at_report.get(node.node_id, 0)

    def _load_changed(self) -> None:
        for listener in self.load_listeners:
            listener()

    def upsert(self, node: Node) -> None:
        self.replace_all([*(n for n in self.nodes.values() if n.node_id != node.node_id), node])

    def remove(self, node_id: str) -> None:
        if node_id in self.nodes:
            self.replace_all(n for n in self.nodes.values() if n.node_id != node_id)

    def _breaker(self) -> CircuitBreaker:
        return CircuitBreaker(self.config.breaker_failures, self.config.breaker_cooldown)

    def breaker(self, node_id: str) -> CircuitBreaker:
        if node_id not in self.breakers:  # a node that left while a request to it was in flight
            self.breakers[node_id] = self._breaker()
        return self.breakers[node_id]

    def available(self, node: Node) -> bool:
        return self.breaker(node.node_id).available()

    def load_of(self, node: Node) -> int:
        """Requests this frontend has in flight there, or what the node reported if that is more."""
        return max(self.load.active(node.node_id), node.reported_queue)

    def of_role(self, *roles: str) -> list[Node]:
        return sorted((n for n in self.nodes.values() if n.role in roles), key=lambda n: n.node_id)

    def has_pair(self) -> bool:
        decodes = [d for d in self.of_role("decode") if self.available(d)]
        return any(compatible(p, d) for p in self.of_role("prefill") if self.available(p) for d in decodes)

    def describe(self) -> list[dict[str, Any]]:
        """The body of `GET /nodes`."""
        out = []
        for node in sorted(self.nodes.values(), key=lambda n: n.node_id):
            b = self.breaker(node.node_id)
            out.append(
                {
                    "node_id": node.node_id,
                    "role": node.role,
                    "url": node.url,
                    "layout": node.layout.to_dict() if node.layout else None,
                    "active": self.load.active(node.node_id),
                    "reported_queue": node.reported_queue,
                    "reported_queued": node.reported_queued,
                    "full": self.full(node),
                    "requests_total": self.load.total.get(node.node_id, 0),
                    "breaker": b.state.name.lower(),
                    "consecutive_failures": b.consecutive_failures,
                }
            )
        return out

    def breaker_states(self) -> dict[str, BreakerState]:
        return {node_id: self.breaker(node_id).state for node_id in self.nodes}


def node_from_record(record: Any) -> Node:
    """A bootstrap `NodeRecord` -> Node."""
    return Node(
        node_id=record.node_id,
        role=record.role,
        url=record.http_url.rstrip("/"),
        layout=record.layout.value(),
        tp_size=len(record.transfer),
        reported_queue=record.load.running + record.load.waiting,
        reported_queued=record.load.queued,
    )


async def watch_bootstrap(nodes: NodeSet, url: str, token: str | None = None) -> None:
    """Mirror the bootstrap registry into `nodes` until cancelled; outages keep the last known set.
    `token`: the cluster token (None: none sent)."""
    from pd_serve.bootstrap.client import BootstrapClient, BootstrapError

    interval = nodes.config.probe_interval
    async with BootstrapClient(url, token=token or "", timeout=max(2.0, interval * 2)) as client:
        etag: str | None = None
        failing = False
        while True:
            try:
                listing = await (
                    client.list_nodes() if etag is None else client.wait_for_change(etag, timeout=interval)
                )
            except BootstrapError as exc:
                if not failing:
                    log.warning("bootstrap %s unreachable (%s); keeping the last known nodes", url, exc)
                failing, etag = True, None
                await asyncio.sleep(interval)
                continue
            if failing:
                log.info("bootstrap %s reachable again", url)
            failing, etag = False, listing.etag
            nodes.replace_all(node_from_record(r) for r in listing.nodes)


async def watch_static(nodes: NodeSet, http: httpx.AsyncClient, headers: dict[str, str]) -> None:
    """Probe the static URL lists every `probe_interval` until cancelled."""
    config = nodes.config
    urls = [(u.rstrip("/"), "prefill") for u in config.prefill_urls]
    urls += [(u.rstrip("/"), "decode") for u in config.decode_urls]
    while True:
        probes = [
            _probe(http, url, role, nodes.nodes.get(url), headers, config.probe_interval)
            for url, role in urls
        ]
        results = await asyncio.gather(*probes)
        nodes.replace_all(node for node in results if node is not None)
        await asyncio.sleep(config.probe_interval)


async def _probe(
    http: httpx.AsyncClient, url: str, role: str, known: Node | None, headers: dict[str, str], timeout: float
) -> Node | None:
    """The node if it answers /health with 200 (its /server_info fetched once), else None."""
    wait = max(2.0, timeout * 2)
    try:
        health = await http.get(f"{url}/health", timeout=wait)
        if health.status_code != 200:
            return None
        if known is not None and (known.layout is not None or known.role == "colocated"):
            return known
        info = (await http.get(f"{url}/server_info", headers=headers, timeout=wait)).json()
    except (httpx.HTTPError, ValueError):
        return None
    if not isinstance(info, dict):
        return None
    if role == "decode" and info.get("role") == "colocated":
        role = "colocated"
    return Node(node_id=url, role=role, url=url, layout=layout_key(info.get("layout")))
