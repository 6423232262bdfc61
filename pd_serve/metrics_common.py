"""What the Prometheus metrics of the bootstrap service, the node API and the frontend share.

Each app keeps its metrics in a registry of its own (`new_registry`), not the process-global one, so
that several apps can live in one process, as in tests. The node and the frontend use the same
latency buckets so that their histograms can be compared bucket by bucket. This module must never
import another pd_serve package: `bootstrap` depends on it.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry

CONTENT_TYPE = CONTENT_TYPE_LATEST  # of the /metrics exposition text
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def new_registry() -> CollectorRegistry:
    return CollectorRegistry(auto_describe=True)
