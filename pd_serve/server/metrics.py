"""Prometheus metrics of one node's API, in a registry of its own (one per app).

Request counts and latency histograms are recorded here as requests pass; the engine-side gauges
(running, waiting, KV pages, prefix-cache hit rate) are copied from the engine's `EngineStats` at
scrape time, so they are never older than the scrape.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, generate_latest

from pd_serve.engine.messages import EngineStats
from pd_serve.metrics_common import ITL_BUCKETS, LATENCY_BUCKETS, new_registry


class NodeMetrics:
    def __init__(self) -> None:
        r = self.registry = new_registry()
        self.requests = Counter(
            "pd_node_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.ttft = Histogram(
            "pd_node_time_to_first_token_seconds", "Arrival to first token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "pd_node_inter_token_latency_seconds", "Time between output tokens", buckets=ITL_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "pd_node_e2e_request_latency_seconds", "Arrival to last token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.prompt_tokens = Counter("pd_node_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("pd_node_generation_tokens", "Generated tokens", registry=r)
        self.finished = Counter(
            "pd_node_engine_requests_finished", "Engine requests by finish reason", ["reason"], registry=r
        )
        self.running = Gauge("pd_node_num_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("pd_node_num_requests_waiting", "Requests waiting for admission", registry=r)
        self.pages_total = Gauge("pd_node_kv_pages_total", "KV pages in the pool", registry=r)
        self.pages_used = Gauge("pd_node_kv_pages_used", "KV pages held by requests", registry=r)
        self.kv_usage = Gauge("pd_node_kv_cache_usage_ratio", "Used / total KV pages", registry=r)
        self.cached_pages = Gauge("pd_node_prefix_cache_pages", "Pages held by the prefix cache", registry=r)
        self.prefix_hit_rate = Gauge(
            "pd_node_prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / tokens looked up", registry=r
        )
        self.engine_requests = Gauge(
            "pd_node_engine_requests", "Requests the engine holds in any phase (0 when idle)", registry=r
        )
        self.in_flight = Gauge(
            "pd_node_requests_in_flight", "Engine requests admitted by the API process, not yet finished", registry=r
        )
        self.open_streams = Gauge("pd_node_open_streams", "SSE streams open to clients", registry=r)
        self.preemptions = Gauge("pd_node_preemptions", "Preemptions since the engine started", registry=r)
        self.engine_alive = Gauge("pd_node_engine_alive", "1 while the engine loop is alive", registry=r)
        self.draining = Gauge("pd_node_draining", "1 once the node drains (SIGTERM/SIGINT): no new requests",
                              registry=r)
        # disaggregation (prefill and decode nodes; zero on a colocated node)
        self.rooms = Gauge("pd_node_transfer_rooms",
                           "Rooms by state: live now (queued: of those, waiting for admission), or finished since start",
                           ["state"], registry=r)
        self.kv_pages = Gauge("pd_node_transfer_kv_pages", "KV pages sent (prefill), received or reused from "
                              "the local prefix cache (decode), since start", ["kind"], registry=r)
        self.transfer_counters = Gauge("pd_node_transfer_engine", "The transfer engine's counters (bytes, "
                                       "dropped messages, failures)", ["counter"], registry=r)
        self.plane_rooms = Gauge("pd_node_transfer_rooms_by_backend", "Rooms finished since start on each "
                                 "data plane the handshakes chose (cma, ucx, tcp)", ["backend", "state"],
                                 registry=r)
        self.plane_connections = Gauge("pd_node_transfer_connections", "Open transfer control connections "
                                       "by the data plane their handshake chose", ["backend"], registry=r)
        self.handoff = Histogram("pd_node_kv_handoff_seconds", "Decode node: arrival to first token committed "
                                 "(waiting for the prefill node and the KV transfer)", buckets=LATENCY_BUCKETS,
                                 registry=r)
        self.prefill_phase = Histogram("pd_node_prefill_phase_seconds", "Prefill node: time per phase of a room",
                                       ["phase"], buckets=LATENCY_BUCKETS, registry=r)
        self.room_failures = Counter("pd_node_transfer_room_failures", "Failed rooms by reason (first words)",
                                     ["reason"], registry=r)

    def update_engine(self, stats: EngineStats | None, alive: bool) -> None:
        self.engine_alive.set(1 if alive else 0)
        if stats is None:
            return
        used = stats.num_total_pages - stats.num_free_pages
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.pages_total.set(stats.num_total_pages)
        self.pages_used.set(used)
        self.kv_usage.set(used / stats.num_total_pages if stats.num_total_pages else 0.0)
        self.cached_pages.set(stats.num_cached_pages)
        queried = stats.prefix_cache_queried_tokens
        self.prefix_hit_rate.set(stats.prefix_cache_hit_tokens / queried if queried else 0.0)
        self.preemptions.set(stats.num_preemptions)
        self.engine_requests.set(stats.num_requests)
        self.rooms.labels(state="live").set(stats.num_in_transfer)
        self.rooms.labels(state="queued").set(stats.num_queued)
        self.rooms.labels(state="succeeded").set(stats.rooms_succeeded)
        self.rooms.labels(state="failed").set(stats.rooms_failed)
        self.kv_pages.labels(kind="sent").set(stats.kv_pages_sent)
        self.kv_pages.labels(kind="received").set(stats.kv_pages_received)
        self.kv_pages.labels(kind="reused").set(stats.kv_pages_reused)
        for name, value in stats.transfer.items():
            self.transfer_counters.labels(counter=name).set(value)
        for backend, counts in stats.transfer_planes.items():
            self.plane_rooms.labels(backend=backend, state="succeeded").set(counts.get("rooms_succeeded", 0))
            self.plane_rooms.labels(backend=backend, state="failed").set(counts.get("rooms_failed", 0))
            self.plane_connections.labels(backend=backend).set(counts.get("connections", 0))

    def update_node(self, in_flight: int, open_streams: int) -> None:
        self.in_flight.set(in_flight)
        self.open_streams.set(open_streams)

    def room_failed(self, reason: str) -> None:
        self.room_failures.labels(reason=" ".join(reason.split()[:3])[:40]).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
