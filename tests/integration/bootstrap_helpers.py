"""Helpers shared by the bootstrap integration tests: sample bodies, waits with deadlines, Redis.

Not a conftest (that file belongs to everyone); test modules import it by name.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from typing import Any, TypeVar

import httpx
import pytest

from pd_serve.bootstrap.process import RedisProcess

T = TypeVar("T")
TTL = 3.0  # short node TTL for the shared servers: expiry tests wait about this long


def registration(role: str = "prefill", page_size: int = 16, tp: int = 1, **changes: Any) -> dict[str, Any]:
    """A valid PUT /v1/nodes/{id} body."""
    body: dict[str, Any] = {
        "role": role,
        "http_url": "http://127.0.0.1:9001",
        "transfer": [{"backend": "tcp", "address": f"127.0.0.1:{17000 + r}"} for r in range(tp)],
        "layout": {
            "architecture": "LlamaForCausalLM",
            "num_layers": 2,
            "num_kv_heads": 2,
            "head_dim": 8,
            "dtype": "float32",
            "page_size": page_size,
            "config_hash": "cafe01",
        },
        "capacity": {"total_pages": 128, "max_running_requests": 8},
        "load": {"running": 0, "waiting": 0, "free_pages": 128},
    }
    body.update(changes)
    return body


def wait_until(probe: Callable[[], T | None], timeout: float = 10.0, what: str = "condition") -> T:
    """Poll `probe` until it returns a truthy value; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"{what} not met within {timeout}s")


def start_redis() -> RedisProcess:
    """A fresh redis-server; skips without one locally, fails in CI (which must run these tests)."""
    if shutil.which("redis-server") is None:
        message = "redis-server is not installed (apt-get install -y redis-server)"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI must run the Redis store tests")
        pytest.skip(message)
    return RedisProcess()


def clear_nodes(http: httpx.Client) -> None:
    """Delete every live node, so a shared server starts each test empty."""
    for node in http.get("/v1/nodes").json()["nodes"]:
        http.delete(f"/v1/nodes/{node['node_id']}")
