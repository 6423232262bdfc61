"""The no-leak check: once a cluster is idle, every counter is back at its idle value.

Per node (`GET /server_info`, its `idle` object): free KV pages equal total pages (prefix-cached pages
count as free: they are evictable), and the engine's requests, running and waiting requests, rooms,
the transfer engine's live sender/receiver rooms and early room requests, the API process's admitted
requests and open streams are all 0. Per frontend: `GET /nodes` shows no active request on any node
and no admitted request (in all and per API key), and every gauge of its /metrics whose name says it
counts requests in flight (`active`, `in_flight`) is 0 in every label set.

`wait_idle` polls until everything is idle or the timeout passes (the rooms of a fault end through
their transfer timeouts, so give at least the longest one), then returns the list of leaks, each
naming the process and the counter: empty means no leak. Used by tests/chaos and bench/soak.py.
Standard library only (urllib), so both can import it.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

POLL_S = 0.25
ZERO_COUNTERS = (
    "engine_requests",
    "running",
    "waiting",
    "rooms",
    "transfer_live_senders",
    "transfer_live_receivers",
    "transfer_pending_room_requests",
    "http_in_flight",
    "open_streams",
)
IN_FLIGHT_WORDS = ("active", "in_flight")


@dataclass(frozen=True)
class Leak:
    process: str  # node id / "frontend"
    counter: str
    value: float
    idle: float

    def __str__(self) -> str:
        return f"{self.process}: {self.counter} is {self.value:g}, idle value {self.idle:g}"


def _get(url: str, headers: dict[str, str] | None = None, timeout: float = 10.0) -> bytes:
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return bytes(r.read())


def node_leaks(name: str, url: str, headers: dict[str, str] | None = None) -> list[Leak]:
    """What is not idle on one node now (an unreachable node is one leak: 'unreachable')."""
    try:
        info = json.loads(_get(f"{url}/server_info", headers))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return [Leak(name, f"unreachable ({exc})", 1, 0)]
    idle: dict[str, int] = info.get("idle") or {}
    if not idle:
        return [Leak(name, "no 'idle' object in /server_info", 1, 0)]
    leaks = (
        [Leak(name, "pages_free", idle["pages_free"], idle["pages_total"])]
        if (idle["pages_free"] != idle["pages_total"])
        else []
    )
    leaks += [Leak(name, key, idle[key], 0) for key in ZERO_COUNTERS if idle.get(key, 0) != 0]
    return leaks


def in_flight_gauges(metrics_text: str) -> dict[str, float]:
    """Samples of /metrics whose metric name says 'active' or 'in_flight' (not _total/_created)."""
    out: dict[str, float] = {}
    for line in metrics_text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name = head.split("{", 1)[0]
        if name.endswith(("_total", "_created")) or not any(w in name for w in IN_FLIGHT_WORDS):
            continue
        try:
            out[head] = float(value)
        except ValueError:
            continue
    return out


def frontend_leaks(url: str, headers: dict[str, str] | None = None) -> list[Leak]:
    try:
        body = json.loads(_get(f"{url}/nodes", headers))
        metrics = _get(f"{url}/metrics", headers).decode()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return [Leak("frontend", f"unreachable ({exc})", 1, 0)]
    nodes = body.get("nodes", [])
    leaks = [Leak("frontend", f"active[{n['node_id']}]", n["active"], 0) for n in nodes if n.get("active")]
    admission = body.get("admission") or {}
    if admission.get("in_flight"):
        leaks.append(Leak("frontend", "admission.in_flight", admission["in_flight"], 0))
    leaks += [
        Leak("frontend", f"admission.by_key[{k}]", v, 0)
        for k, v in (admission.get("by_key") or {}).items()
        if v
    ]
    leaks += [Leak("frontend", sample, v, 0) for sample, v in in_flight_gauges(metrics).items() if v]
    return leaks


def cluster_leaks(
    nodes: Iterable[tuple[str, str]], frontend: str | None, headers: dict[str, str] | None = None
) -> list[Leak]:
    leaks = [leak for name, url in nodes for leak in node_leaks(name, url, headers)]
    if frontend is not None:
        leaks += frontend_leaks(frontend, headers)
    return leaks


def wait_idle(
    nodes: Iterable[tuple[str, str]],
    frontend: str | None,
    timeout: float,
    headers: dict[str, str] | None = None,
) -> list[Leak]:
    """Poll until no leak or `timeout` seconds; returns the leaks of the last poll ([] = idle)."""
    nodes = list(nodes)
    deadline = time.monotonic() + timeout
    while True:
        leaks = cluster_leaks(nodes, frontend, headers)
        if not leaks or time.monotonic() > deadline:
            return leaks
        time.sleep(POLL_S)


def report(leaks: list[Leak]) -> str:
    return "no leak" if not leaks else "leaks:\n" + "\n".join(f"  {leak}" for leak in leaks)


def summary(leaks: list[Leak]) -> list[dict[str, Any]]:
    return [{"process": x.process, "counter": x.counter, "value": x.value, "idle": x.idle} for x in leaks]
