"""Frontend policies, circuit breaker, load guard, router and node-set updates: in-process, no network."""

from __future__ import annotations

import random

import pytest

from pd_serve.frontend.breaker import BreakerState, CircuitBreaker
from pd_serve.frontend.config import FrontendConfig, FrontendConfigError
from pd_serve.frontend.load import LoadTracker
from pd_serve.frontend.nodes import Node, NodeSet, compatible, layout_key
from pd_serve.frontend.policies import LeastLoad, PowerOfTwo, PrefixAware, RoundRobin, prefix_keys
from pd_serve.frontend.router import NoPair, Router

_WIRE = {"architecture": "Llama", "num_layers": 2, "num_kv_heads": 2, "head_dim": 8, "page_size": 16,
         "dtype": "float32", "config_hash": "abc"}
LAYOUT = layout_key(_WIRE)
OTHER = layout_key({**_WIRE, "page_size": 32})


def node(node_id: str, role: str = "prefill", layout: object = LAYOUT, queue: int = 0) -> Node:
    return Node(node_id, role, f"http://{node_id}", layout, 1, queue)  # type: ignore[arg-type]


def loads(table: dict[str, int]):  # noqa: ANN201
    return lambda n: table.get(n.node_id, 0)


def test_round_robin_cycles() -> None:
    nodes = [node("a"), node("b"), node("c")]
    rr = RoundRobin()
    assert [rr.pick(nodes, loads({}), "").node_id for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]


def test_least_load_picks_lowest_and_spreads_ties() -> None:
    nodes = [node("a"), node("b"), node("c")]
    ll = LeastLoad()
    assert ll.pick(nodes, loads({"a": 3, "b": 1, "c": 2}), "").node_id == "b"
    picks = {ll.pick(nodes, loads({}), "").node_id for _ in range(3)}
    assert picks == {"a", "b", "c"}


def test_power_of_two_never_picks_the_most_loaded_of_three() -> None:
    nodes = [node("a"), node("b"), node("c")]
    p2 = PowerOfTwo(random.Random(0))
    picks = {p2.pick(nodes, loads({"a": 9, "b": 0, "c": 1}), "").node_id for _ in range(50)}
    assert "a" not in picks and picks <= {"b", "c"}
    assert p2.pick([nodes[0]], loads({}), "").node_id == "a"


def test_prefix_aware_sticks_to_the_owner_until_it_is_much_more_loaded() -> None:
    nodes = [node("a"), node("b")]
    pa = PrefixAware(max_chars=256, balance=2)
    shared = "x" * 130
    first = pa.pick(nodes, loads({}), shared + " question one").node_id
    other = "b" if first == "a" else "a"
    # a different prompt with the same 128-character prefix goes to the same node
    assert pa.pick(nodes, loads({first: 2}), shared + " another question").node_id == first
    # unless the owner has more than `balance` requests beyond the least loaded
    assert pa.pick(nodes, loads({first: 3}), shared + " third").node_id == other
    assert pa.owner(shared + " third") == other


def test_prefix_keys_grow_by_blocks() -> None:
    assert len(prefix_keys("a" * 130, 256)) == 3
    assert prefix_keys("a" * 64 + "b", 256)[0] == prefix_keys("a" * 64 + "c", 256)[0]
    assert len(prefix_keys("a" * 1000, 256)) == 4


def test_breaker_opens_after_n_failures_and_probes_once_after_cooldown() -> None:
    now = [0.0]
    b = CircuitBreaker(failures=3, cooldown=5.0, clock=lambda: now[0])
    for _ in range(2):
        b.failure()
    assert b.state is BreakerState.CLOSED and b.acquire()
    b.failure()
    assert b.state is BreakerState.OPEN and not b.available()
    now[0] = 5.0
    assert b.acquire() and b.state is BreakerState.HALF_OPEN
    assert not b.acquire()  # one probe at a time
    b.failure()  # the probe failed: open for another cool-down
    assert b.state is BreakerState.OPEN and not b.available()
    now[0] = 10.0
    assert b.acquire()
    b.success()
    assert b.state is BreakerState.CLOSED and b.consecutive_failures == 0 and b.acquire()


def test_breaker_release_frees_the_probe_slot() -> None:
    now = [0.0]
    b = CircuitBreaker(failures=1, cooldown=1.0, clock=lambda: now[0])
    b.failure()
    now[0] = 1.0
    assert b.acquire() and not b.acquire()
    b.release()  # the probe was cancelled by its client: no verdict, another may probe
    assert b.acquire()


def test_load_guard_releases_once_on_every_path() -> None:
    t = LoadTracker()
    g = t.acquire("a")
    t.acquire("a").release()
    assert t.active("a") == 1
    g.release()
    g.release()
    assert t.active("a") == 0 and t.snapshot() == {}
    with pytest.raises(RuntimeError), t.acquire("b"):
        raise RuntimeError("upstream failed")
    assert t.active("b") == 0 and t.total["b"] == 1


def test_config_validation_names_the_flag() -> None:
    with pytest.raises(FrontendConfigError, match="--bootstrap"):
        FrontendConfig()
    with pytest.raises(FrontendConfigError, match="--policy"):
        FrontendConfig(decode_urls=("http://d",), policy="random")
    with pytest.raises(FrontendConfigError, match="--max-retries"):
        FrontendConfig(decode_urls=("http://d",), max_retries=-1)
    with pytest.raises(FrontendConfigError, match="not both"):
        FrontendConfig(bootstrap="http://b", decode_urls=("http://d",))
    assert FrontendConfig(bootstrap="http://b:1").static is False
    assert "secret" not in repr(FrontendConfig(decode_urls=("http://d",), api_keys=("secret",), cluster_token="secret"))


def _router(nodes: list[Node], **kw: object) -> tuple[Router, NodeSet]:
    config = FrontendConfig(bootstrap="http://b:1", **kw)  # type: ignore[arg-type]
    ns = NodeSet(config)
    ns.replace_all(nodes)
    return Router(config, ns), ns


def test_router_never_pairs_incompatible_layouts() -> None:
    p_bad, p_ok = node("p-bad", layout=OTHER), node("p-ok")
    d = node("d", "decode")
    assert not compatible(p_bad, d) and compatible(p_ok, d)
    router, _ = _router([p_bad, p_ok, d])
    for _ in range(4):
        choice = router.choose("hello")
        assert choice.prefill is not None and choice.prefill.node_id == "p-ok"
    router, _ = _router([p_bad, d])
    with pytest.raises(NoPair, match="layouts"):
        router.choose("hello")


def test_router_sends_short_prompts_and_prefill_less_clusters_to_decode_alone() -> None:
    router, _ = _router([node("p"), node("d", "decode")], local_prefill_threshold=10)
    assert router.choose("short").prefill is None
    assert router.choose("a much longer prompt").prefill is not None
    router, _ = _router([node("c", "colocated")])
    assert router.choose("anything").prefill is None


def test_router_excludes_failed_nodes_and_open_breakers() -> None:
    router, ns = _router([node("p1"), node("p2"), node("d", "decode")], breaker_failures=1)
    assert router.choose("x", frozenset({"p1"})).prefill.node_id == "p2"  # type: ignore[union-attr]
    ns.breaker("p2").failure()
    for _ in range(3):
        assert router.choose("x").prefill.node_id == "p1"  # type: ignore[union-attr]
    with pytest.raises(NoPair):
        router.choose("x", frozenset({"p1"}))


def test_node_set_joins_and_leaves_reset_breakers() -> None:
    ns = NodeSet(FrontendConfig(bootstrap="http://b:1", breaker_failures=1))
    ns.replace_all([node("p"), node("d", "decode")])
    assert ns.has_pair() and ns.changed.is_set()
    ns.breaker("p").failure()
    assert not ns.has_pair()
    ns.remove("p")
    assert set(ns.nodes) == {"d"} and not ns.has_pair()
    ns.upsert(node("p"))
    assert ns.has_pair()  # a node that comes back starts with a closed breaker
    ns.upsert(node("p", queue=7))
    assert ns.load_of(ns.nodes["p"]) == 7
    assert [n["node_id"] for n in ns.describe()] == ["d", "p"]
