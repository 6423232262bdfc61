"""The client's retry bound against a port nobody listens on (no service needed)."""

from __future__ import annotations

import asyncio

import pytest

from pd_serve.bootstrap.client import BootstrapClient, BootstrapError, RetryPolicy
from pd_serve.bootstrap.process import free_port
from pd_serve.bootstrap.records import NodeRegistration

REG = NodeRegistration.model_validate(
    {
        "role": "colocated",
        "http_url": "http://127.0.0.1:9003",
        "layout": {
            "architecture": "A",
            "num_layers": 1,
            "num_kv_heads": 1,
            "head_dim": 4,
            "dtype": "float32",
            "page_size": 4,
            "config_hash": "h",
        },
        "capacity": {"total_pages": 8, "max_running_requests": 2},
    }
)


def test_register_gives_up_after_the_policy_attempts() -> None:
    async def scenario() -> BootstrapError:
        policy = RetryPolicy(attempts=3, initial_backoff=0.01, max_backoff=0.02)
        async with BootstrapClient(
            f"http://127.0.0.1:{free_port()}", token="", timeout=2.0, retry=policy
        ) as c:
            with pytest.raises(BootstrapError) as info:
                await c.register("n0", REG)
            return info.value

    error = asyncio.run(scenario())
    assert error.status == 0 and "unreachable" in str(error)
