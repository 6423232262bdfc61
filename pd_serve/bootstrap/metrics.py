"""Prometheus metrics of one bootstrap replica, in a registry of its own.

Counters are per replica; the node gauge is read from the store at scrape time, so with Redis every
replica reports the shared view.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterable

from prometheus_client import Counter, Gauge, generate_latest

from pd_serve.bootstrap.records import ROLES, NodeRecord
from pd_serve.metrics_common import new_registry


class BootstrapMetrics:
    """Nodes by role, registrations, expiries and request counts."""

    def __init__(self) -> None:
        self.registry = new_registry()
        self.nodes = Gauge("pd_bootstrap_nodes", "Live nodes by role", ["role"], registry=self.registry)
        self.registrations = Counter(
            "pd_bootstrap_registrations",
            "Successful PUTs: kind=new (joins) or refresh",
            ["kind"],
            registry=self.registry,
        )
        self.heartbeats = Counter("pd_bootstrap_heartbeats", "Accepted heartbeats", registry=self.registry)
        self.expiries = Counter(
            "pd_bootstrap_expiries", "Nodes removed because their TTL passed", registry=self.registry
        )
        self.requests = Counter(
            "pd_bootstrap_requests",
            "HTTP requests by route template and status",
            ["method", "route", "status"],
            registry=self.registry,
        )

    def on_expire(self, node_id: str) -> None:
        self.expiries.inc()

    def render(self, live: Iterable[NodeRecord]) -> bytes:
        """The exposition text, after setting the node gauge from `live`."""
        by_role = Tally(r.role for r in live)
        for role in ROLES:
            self.nodes.labels(role=role).set(by_role.get(role, 0))
        return generate_latest(self.registry)
