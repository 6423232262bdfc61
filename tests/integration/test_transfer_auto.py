"""`--transfer-backend auto` picks each connection's data plane at the handshake: cma on one host,
ucx across hosts or where cma's probe read fails, tcp as the last resort; a forced backend offers
only itself. Engines run in this process (a thread and a loop each); "another host" is a sender
whose host id was changed after it started. Every wait has a deadline.
"""

from __future__ import annotations

import errno
import importlib.util
import logging
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import pytest
import torch
from transfer_helpers import local_engine, until, wait_terminal

from pd_serve.transfer import RoomState, TransferEngine

TOKEN = "auto-negotiation-token"
WAIT_S = 5.0
HAS_UCX = importlib.util.find_spec("ucxx") is not None
ACROSS_HOSTS = "ucx" if HAS_UCX else "tcp"  # what auto picks for a peer on another host


def _engine(backend: str, seed: int | None = None) -> TransferEngine:
    return local_engine(backend, TOKEN, WAIT_S, seed)


@contextmanager
def _pair(sender_backend: str, receiver_backend: str) -> Iterator[tuple[TransferEngine, TransferEngine]]:
    with ExitStack() as stack:
        sender = stack.enter_context(_engine(sender_backend, seed=1))
        receiver = stack.enter_context(_engine(receiver_backend))
        yield sender, receiver


def _move(sender: TransferEngine, receiver: TransferEngine, room: int) -> RoomState:
    """One room of two pages; on success the destination pages equal the source pages."""
    tx = sender.sender(room)
    rx = receiver.receiver(room, sender.endpoint, [2, 3], expected_tokens=8, prompt_hash="h")
    if until(lambda: tx.poll() is RoomState.WAITING_FOR_INPUT):
        tx.send([5, 6])
        tx.finish(7, None)
    (state,) = wait_terminal([rx])
    if state is RoomState.SUCCESS:
        for layer in range(2):
            for kv in range(2):
                assert torch.equal(
                    receiver.pools.pools[layer][kv][[2, 3]], sender.pools.pools[layer][kv][[5, 6]]
                )
        assert until(lambda: tx.poll() is RoomState.SUCCESS), tx.failure_reason
    else:
        tx.abort()
    return state


def _planes(sender: TransferEngine, receiver: TransferEngine) -> tuple[list[str], list[str]]:
    return list(sender.peers().values()), list(receiver.peers().values())


def test_auto_on_one_host_picks_cma(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="pd_serve.transfer"), _pair("auto", "auto") as (tx, rx):
        assert tx.endpoint.startswith("auto://") and tx.backends[0] == "cma" and tx.backends[-1] == "tcp"
        assert _move(tx, rx, 11) is RoomState.SUCCESS
        assert _planes(tx, rx) == (["cma"], ["cma"])
        assert rx.peers() == {f"to {tx.endpoint}": "cma"}
        assert rx.plane_stats()["cma"] == {"connections": 1, "rooms_succeeded": 1, "rooms_failed": 0}
        assert tx.plane_stats()["cma"]["rooms_succeeded"] == 1
        assert _move(tx, rx, 12) is RoomState.SUCCESS  # the connection is kept: no second handshake
    lines = [r.getMessage() for r in caplog.records if "transfer connection" in r.getMessage()]
    assert len(lines) == 2 and all(line.endswith("backend cma") for line in lines), lines


@pytest.mark.parametrize(("sender", "receiver"), [("tcp", "auto"), ("auto", "tcp")])
def test_a_peer_that_offers_only_tcp_gets_tcp(sender: str, receiver: str) -> None:
    with _pair(sender, receiver) as (tx, rx):
        assert _move(tx, rx, 21) is RoomState.SUCCESS
        assert _planes(tx, rx) == (["tcp"], ["tcp"])


def test_auto_across_hosts_skips_cma(caplog: pytest.LogCaptureFixture) -> None:
    """The sender says it runs elsewhere: cma is refused on the host id, ucx (or tcp) takes over,
    and the receiver's one log line for the peer says why cma was not used."""
    with caplog.at_level(logging.INFO, logger="pd_serve.transfer"), _pair("auto", "auto") as (tx, rx):
        assert tx._transfer is not None
        tx._transfer.handshake.host_id = "elsewhere/not-this-boot"
        assert _move(tx, rx, 31) is RoomState.SUCCESS
        assert _planes(tx, rx) == ([ACROSS_HOSTS], [ACROSS_HOSTS])
    (line,) = [r.getMessage() for r in caplog.records if "transfer connection to" in r.getMessage()]
    assert f"backend {ACROSS_HOSTS}" in line and "cma needs both engines on one host" in line


def test_a_failed_cma_probe_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """Same host, but ptrace is not allowed (Yama ptrace_scope, another user): the probe read fails."""

    def denied(*args: object, **kwargs: object) -> bool:
        raise OSError(errno.EPERM, "process_vm_readv: Operation not permitted")

    monkeypatch.setattr("pd_serve.transfer.cma_plane.read_remote", denied)
    with _pair("auto", "auto") as (tx, rx):
        assert _move(tx, rx, 41) is RoomState.SUCCESS
        assert _planes(tx, rx) == ([ACROSS_HOSTS], [ACROSS_HOSTS])


@pytest.mark.parametrize(("sender", "receiver"), [("tcp", "cma"), ("cma", "tcp"), ("auto", "cma")])
def test_a_forced_backend_offers_only_itself(sender: str, receiver: str) -> None:
    with _pair(sender, receiver) as (tx, rx):
        if "tcp" in (sender, receiver):  # nothing in common: refused, the reason names both sides
            handle = rx.receiver(51, tx.endpoint, [2, 3], expected_tokens=8, prompt_hash="h")
            assert wait_terminal([handle]) == [RoomState.FAILED]
            assert "cma" in (handle.failure_reason or "") and "tcp" in (handle.failure_reason or "")
        else:
            assert _move(tx, rx, 52) is RoomState.SUCCESS
            assert _planes(tx, rx) == (["cma"], ["cma"])


@pytest.mark.skipif(not HAS_UCX, reason="ucxx is not installed")
def test_forced_ucx_against_auto_uses_ucx() -> None:
    with _pair("auto", "ucx") as (tx, rx):
        assert rx.backends == ["ucx"]
        assert _move(tx, rx, 61) is RoomState.SUCCESS
        assert _planes(tx, rx) == (["ucx"], ["ucx"])


@pytest.mark.skipif(not HAS_UCX, reason="ucxx is not installed")
def test_an_idle_ucx_plane_makes_no_progress_calls() -> None:
    """Before, ucxx's blocking mode called worker.progress() back to back once a connection had
    seen one event (one core per engine process while idle). Now the worker is progressed only
    when its event descriptor wakes the loop: idle, the count stands still."""
    with _pair("ucx", "ucx") as (tx, rx):
        assert _move(tx, rx, 71) is RoomState.SUCCESS
        loops = [tx._transfer, rx._transfer]
        assert all(n is not None for n in loops)
        progress = [n.planes["ucx"].progress for n in loops if n is not None]  # type: ignore[attr-defined]
        assert until(
            lambda: all(n is not None and not n.rooms.senders and not n.rooms.receivers for n in loops)
        )
        assert until(
            lambda: all(n is not None and n._sweeper is not None and n._sweeper.done() for n in loops)
        )
        assert until(lambda: all(p.inflight == 0 for p in progress))
        time.sleep(0.2)  # UCX's last internal events of the room (its wire-up, acknowledgements)
        before = [p.progress_calls for p in progress]
        time.sleep(1.0)
        assert [p.progress_calls for p in progress] == before
        assert _move(tx, rx, 72) is RoomState.SUCCESS  # and it still wakes for the next room
