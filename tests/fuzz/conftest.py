"""Fixtures of the fuzz tests: one node (with its engine), a frontend in front of it and a bootstrap
service, all spawned at once for the session (the node's start is most of the directory's time);
each client fixture waits only for the service it talks to."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from fuzz_support import Stack, start_bootstrap, start_frontend, start_node


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    node = start_node()
    services = Stack(node=node, frontend=start_frontend(node.url), bootstrap=start_bootstrap())
    try:
        yield services
    finally:
        for s in (services.frontend, services.node, services.bootstrap):
            s.stop()


@pytest.fixture(scope="session")
def node_http(stack: Stack) -> Iterator[httpx.Client]:
    stack.node.ready()
    with httpx.Client(base_url=stack.node.url, timeout=180) as c:
        yield c


@pytest.fixture(scope="session")
def frontend_http(stack: Stack) -> Iterator[httpx.Client]:
    stack.node.ready()
    stack.frontend.ready()  # healthy once it has seen the node
    with httpx.Client(base_url=stack.frontend.url, timeout=180) as c:
        yield c


@pytest.fixture(scope="session")
def bootstrap_http(stack: Stack) -> Iterator[httpx.Client]:
    stack.bootstrap.ready()
    with httpx.Client(base_url=stack.bootstrap.url, timeout=30) as c:
        yield c
