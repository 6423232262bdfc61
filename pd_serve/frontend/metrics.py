"""Prometheus metrics of the frontend, in a registry of its own (one per app).

Counters and histograms are recorded as requests pass; per-node gauges (active requests, breaker
state, live nodes) are copied from the `NodeSet` at scrape time. Latencies are as the client sees
them through the frontend: TTFT is arrival to the first byte of the answer, ITL the gap between
relayed stream chunks, the handoff gap the time between the first and the second chunk.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge, Histogram, generate_latest

from pd_serve.frontend.nodes import NodeSet
from pd_serve.metrics_common import ITL_BUCKETS, LATENCY_BUCKETS, new_registry


class FrontendMetrics:
    def __init__(self) -> None:
        r = self.registry = new_registry()
        self.requests = Counter(
            "pd_frontend_requests", "Client requests by route and status", ["route", "status"], registry=r
        )
        self.retries = Counter(
            "pd_frontend_retries", "Attempts retried on another pair, by reason", ["reason"], registry=r
        )
        self.node_requests = Counter(
            "pd_frontend_node_requests", "Requests sent to each node", ["node", "role"], registry=r
        )
        self.node_failures = Counter(
            "pd_frontend_node_failures", "Failures blamed on each node", ["node", "kind"], registry=r
        )
        self.local_prefill = Counter(
            "pd_frontend_local_prefill",
            "Requests sent to a decode node alone (it prefills locally)",
            registry=r,
        )
        self.active = Gauge(
            "pd_frontend_node_active_requests", "Requests in flight per node", ["node", "role"], registry=r
        )
        self.breaker = Gauge(
            "pd_frontend_node_breaker_state",
            "Circuit breaker: 0 closed, 1 half-open, 2 open",
            ["node"],
            registry=r,
        )
        self.live = Gauge("pd_frontend_nodes", "Live nodes by role", ["role"], registry=r)
        self.queue_depth = Gauge(
            "pd_frontend_queue_depth", "Requests waiting in the frontend while every decode node is full",
            registry=r,
        )
        self.queue_wait = Histogram(
            "pd_frontend_queue_wait_seconds", "Time a request waited in the frontend's queue (those that waited)",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.queue_refused = Counter(
            "pd_frontend_queue_refused", "Requests refused by the queue: full or timed out", registry=r
        )
        self.ttft = Histogram(
            "pd_frontend_time_to_first_token_seconds",
            "Arrival to first byte relayed",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "pd_frontend_inter_chunk_latency_seconds",
            "Gap between relayed stream chunks",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.handoff = Histogram(
            "pd_frontend_handoff_gap_seconds",
            "First to second relayed stream chunk",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "pd_frontend_e2e_request_latency_seconds",
            "Arrival to last byte relayed",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def render(self, nodes: NodeSet) -> bytes:
        self.active.clear()
        self.breaker.clear()
        for node in nodes.nodes.values():
            self.active.labels(node=node.node_id, role=node.role).set(nodes.load.active(node.node_id))
            self.breaker.labels(node=node.node_id).set(nodes.breaker(node.node_id).state.value)
        for role in ("prefill", "decode", "colocated"):
            self.live.labels(role=role).set(len(nodes.of_role(role)))
        return generate_latest(self.registry)


@dataclass
class Timing:
    """One client request's clock across its attempts: its arrival and the chunks relayed so far."""

    arrival: float = field(default_factory=time.monotonic)
    last_chunk: float = 0.0
    chunks: int = 0

    def chunk_sent(self, metrics: FrontendMetrics) -> None:
        """A chunk reached the client: TTFT for the first, ITL after it, the handoff gap for the second."""
        now = time.monotonic()
        if self.chunks == 0:
            metrics.ttft.observe(now - self.arrival)
        else:
            metrics.itl.observe(now - self.last_chunk)
            if self.chunks == 1:
                metrics.handoff.observe(now - self.last_chunk)
        self.chunks += 1
        self.last_chunk = now
