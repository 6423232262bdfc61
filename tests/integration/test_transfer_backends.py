"""Two real processes on loopback, per backend: byte-exact KV moves and every failure path."""

from __future__ import annotations

import random
import time

import pytest
import torch
from transfer_helpers import Peer, wait_state, wait_terminal
from transfer_peer import NUM_LAYERS, NUM_PAGES, TIMEOUT_S, config, fingerprint, make_pools

from pd_serve.transfer import RoomState, TransferEngine

BACKENDS = ["tcp", "cma", "ucx"]
SEED, TOKEN, DTYPE = 1234, "s3cret", "bfloat16"


@pytest.fixture(scope="module", params=BACKENDS)
def peer(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    p = Peer(request.param, DTYPE, SEED, TOKEN)
    p.backend = request.param  # type: ignore[attr-defined]
    yield p
    p.kill()


@pytest.fixture
def decode(peer):  # type: ignore[no-untyped-def]
    engine = TransferEngine(config(peer.backend, TOKEN), make_pools(DTYPE, None), fingerprint(DTYPE)).start()
    yield engine
    engine.close()


def _rooms(n: int) -> list[int]:
    return [random.getrandbits(63) for _ in range(n)]


def test_many_concurrent_rooms_are_byte_exact(peer, decode) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(7)
    src_pool = make_pools(DTYPE, SEED)
    free_src, free_dst = list(range(NUM_PAGES)), list(range(NUM_PAGES))
    rng.shuffle(free_src)
    rng.shuffle(free_dst)
    plans = []
    for i, room in enumerate(_rooms(32)):
        n = 1 + i % 3  # 32 rooms x up to 3 pages fit the 96-page pools
        src = sorted(free_src[:n]) if i % 4 == 0 else free_src[:n]  # some runs contiguous, most scattered
        dst = free_dst[:n]
        del free_src[:n], free_dst[:n]
        plans.append((room, src, dst, "split" if i % 2 else "send"))
    handles = []
    for room, src, dst, action in plans:
        peer.expect(room, src, action)
        handles.append(
            decode.receiver(
                room, peer.endpoint, dst, expected_tokens=len(dst) * 4 - 1, prompt_hash=f"h{room}"
            )
        )
    assert wait_terminal(handles) == [RoomState.SUCCESS] * len(handles), [h.failure_reason for h in handles]
    assert all(s == "SUCCESS" for s, _ in peer.wait_status([p[0] for p in plans], "SUCCESS").values())
    for (room, src, dst, action), rx in zip(plans, handles):
        assert rx.first_token == room % 50000
        assert rx.first_token_logprobs == ({"logprob": -0.25, "room": room} if action == "send" else [-0.5])
        for layer in range(NUM_LAYERS):
            for kv in range(2):
                got, want = decode.pools.pools[layer][kv][dst], src_pool[layer][kv][src]
                assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_abort_from_decode_reaches_prefill(peer, decode) -> None:  # type: ignore[no-untyped-def]
    (room,) = _rooms(1)
    peer.expect(room, [5], "hold")
    rx = decode.receiver(room, peer.endpoint, [9], expected_tokens=2, prompt_hash="h")
    assert wait_state([rx], RoomState.WAITING_FOR_INPUT)
    rx.abort("client went away")
    assert wait_terminal([rx]) == [RoomState.FAILED]
    state, reason = peer.wait_status([room], "FAILED")[room]
    assert state == "FAILED" and "client went away" in (reason or "")


def test_abort_from_prefill_reaches_decode(peer, decode) -> None:  # type: ignore[no-untyped-def]
    (room,) = _rooms(1)
    peer.expect(room, [5], "abort")
    rx = decode.receiver(room, peer.endpoint, [9], expected_tokens=2, prompt_hash="h")
    assert wait_terminal([rx]) == [RoomState.FAILED]
    assert "prefill aborted the room" in (rx.failure_reason or "")


def test_waiting_room_times_out_on_both_sides(peer, decode) -> None:  # type: ignore[no-untyped-def]
    (room,) = _rooms(1)
    peer.expect(room, [5], "hold")
    rx = decode.receiver(room, peer.endpoint, [9], expected_tokens=2, prompt_hash="h")
    assert wait_terminal([rx], timeout=TIMEOUT_S + 5) == [RoomState.FAILED]
    assert "timed out" in (rx.failure_reason or "")
    assert peer.wait_status([room], "FAILED")[room][0] == "FAILED"


def test_layout_mismatch_names_the_field(peer) -> None:  # type: ignore[no-untyped-def]
    fp = fingerprint(DTYPE, config_hash="cfg-2")
    with TransferEngine(config(peer.backend, TOKEN), make_pools(DTYPE, None), fp) as other:
        (room,) = _rooms(1)
        peer.expect(room, [5], "send")
        rx = other.receiver(room, peer.endpoint, [9], expected_tokens=2, prompt_hash="h")
        assert wait_terminal([rx]) == [RoomState.FAILED]
        assert "config_hash" in (rx.failure_reason or "")
        state, reason = peer.wait_status([room], "FAILED")[room]
        assert state == "FAILED" and "config_hash" in (reason or "")


def test_wrong_token_is_refused(peer) -> None:  # type: ignore[no-untyped-def]
    with TransferEngine(config(peer.backend, "wrong"), make_pools(DTYPE, None), fingerprint(DTYPE)) as other:
        (room,) = _rooms(1)
        rx = other.receiver(room, peer.endpoint, [9], expected_tokens=2, prompt_hash="h")
        assert wait_terminal([rx]) == [RoomState.FAILED]
        assert "token" in (rx.failure_reason or "")


def test_duplicate_room_is_refused(peer, decode) -> None:  # type: ignore[no-untyped-def]
    with TransferEngine(config(peer.backend, TOKEN), make_pools(DTYPE, None), fingerprint(DTYPE)) as other:
        (room,) = _rooms(1)
        peer.expect(room, [5], "hold")
        first = decode.receiver(room, peer.endpoint, [9], expected_tokens=2, prompt_hash="h")
        assert wait_state([first], RoomState.WAITING_FOR_INPUT)
        second = other.receiver(room, peer.endpoint, [10], expected_tokens=2, prompt_hash="h")
        assert wait_terminal([second]) == [RoomState.FAILED]
        assert "duplicate room" in (second.failure_reason or "")
        assert first.poll() is RoomState.WAITING_FOR_INPUT
        with pytest.raises(ValueError, match="duplicate room"):
            decode.receiver(room, peer.endpoint, [11], expected_tokens=2, prompt_hash="h")
        first.abort()


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_then_kill_9_of_prefill_fails_decode_rooms(backend: str) -> None:
    victim = Peer(backend, "float32", SEED + 1, None)
    try:
        with TransferEngine(
            config(backend, None), make_pools("float32", None), fingerprint("float32")
        ) as engine:
            (room,) = _rooms(1)
            src, dst = [40, 3, 17, 18], [60, 61, 2, 90]
            victim.expect(room, src, "split")
            rx = engine.receiver(room, victim.endpoint, dst, 15, "h")
            assert wait_terminal([rx]) == [RoomState.SUCCESS], rx.failure_reason
            want = make_pools("float32", SEED + 1)
            for layer in range(NUM_LAYERS):
                for kv in range(2):
                    assert torch.equal(engine.pools.pools[layer][kv][dst], want[layer][kv][src])
            rooms = _rooms(4)
            for i, room in enumerate(rooms):
                victim.expect(room, [2 * i, 2 * i + 1], "partial")
            handles = [
                engine.receiver(r, victim.endpoint, [10 + i, 20 + i], 8, "h") for i, r in enumerate(rooms)
            ]
            assert wait_state(handles, RoomState.TRANSFERRING)
            killed_at = time.monotonic()
            victim.kill()
            assert wait_terminal(handles, timeout=TIMEOUT_S + 3) == [RoomState.FAILED] * 4
            assert time.monotonic() - killed_at < TIMEOUT_S + 3
            assert all(h.failure_reason for h in handles)
    finally:
        victim.kill()


@pytest.mark.parametrize("backend", BACKENDS)
def test_kill_9_of_decode_fails_prefill_rooms(backend: str) -> None:
    victim = Peer(backend, DTYPE, SEED, None)
    try:
        with TransferEngine(config(backend, None), make_pools(DTYPE, SEED), fingerprint(DTYPE)) as engine:
            rooms = _rooms(4)
            handles = [engine.sender(r) for r in rooms]
            for i, room in enumerate(rooms):
                victim.cmd(
                    op="receive", room=room, endpoint=engine.endpoint, dst=[2 * i, 2 * i + 1], tokens=8
                )
            assert wait_state(handles, RoomState.WAITING_FOR_INPUT)
            for i, tx in enumerate(handles):
                tx.send([10 + i, 30 + i], layers=(0, 1))
            assert wait_state(handles, RoomState.TRANSFERRING)
            killed_at = time.monotonic()
            victim.kill()
            assert wait_terminal(handles, timeout=TIMEOUT_S + 3) == [RoomState.FAILED] * 4
            assert time.monotonic() - killed_at < TIMEOUT_S + 3
    finally:
        victim.kill()
