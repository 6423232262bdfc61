"""A prefill or decode node joins the bootstrap registry only once it is ready to serve: the frontend
sends work as soon as it sees the entry. It registered once its engine was up, while its API process
could still be loading the tokenizer (the walkthrough's first request then failed on CI)."""

from __future__ import annotations

import time

import httpx
from pd_cluster import RoleProcess

from pd_serve.bootstrap.process import BootstrapProcess


def test_a_node_is_ready_when_it_appears_in_the_registry() -> None:
    bootstrap = BootstrapProcess()
    node = None
    try:
        node = RoleProcess("prefill", bootstrap.url, [], wait=False)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and node.popen.poll() is None:
            listed = httpx.get(f"{bootstrap.url}/v1/nodes", timeout=10).json()["nodes"]
            if any(n["node_id"] == node.node_id for n in listed):
                break
            time.sleep(0.01)
        else:
            raise AssertionError(f"the node never registered:\n{node.log_text()[-3000:]}")
        assert httpx.get(f"{node.url}/health", timeout=10).status_code == 200
    finally:
        if node is not None:
            node.stop()
        bootstrap.stop()
