"""Fuzzing the KV-transfer control port of a prefill engine, over real loopback sockets.

Targets: `transfer_peer.py` processes (a prefill-side TransferEngine each) for the backends tcp, cma,
ucx and auto (which raw peers reach over tcp) with a cluster token, and tcp without one (there,
every peer passes the handshake). Hostile
peers send generated and hand-written control frames before and after the handshake: every message
kind with plausible or hostile fields (ints past 64 bits, NaN, wrong types, huge lists, missing and
unknown fields), broken framing (lying lengths, garbage headers, truncated frames), messages out of
order, and slow-loris connections. Properties: the target process stays alive; it closes each hostile
connection once the peer has sent everything (or within its connect_timeout before the handshake);
afterwards it still serves a legitimate room byte for byte, holds no room, early request or
connection, and its peak memory stayed bounded.

Budget: about 25 s on a 2-core machine (mostly starting the targets); PD_SERVE_FUZZ_SCALE multiplies
the example counts. Fixed seed, no example database (fuzz_support.fuzz_settings).
"""

from __future__ import annotations

import importlib.util
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from fuzz_support import fuzz_settings
from hypothesis import given
from hypothesis import strategies as st
from transfer_fuzz_support import (
    ALL_KINDS,
    FINGERPRINT,
    PAGE_BYTES,
    READ_TIMEOUT_S,
    ROOM_KINDS,
    TARGET_TIMEOUT_S,
    TOKEN,
    U64,
    FakeSender,
    RawPeer,
    Target,
    frame,
    header_bytes,
    hello_for,
    hostile_frame,
    legit_room,
    message_frame,
    near_data,
    peer_module,
    wait_room_terminal,
    wait_settled,
)

from pd_serve.transfer import TransferEngine
from pd_serve.transfer.messages import (
    MAX_HEADER_BYTES,
    Data,
    Finish,
    FinishAck,
    Hello,
    HelloProof,
    HelloReply,
    RoomAbort,
    RoomAccept,
    RoomRequest,
)

HAS_UCX = importlib.util.find_spec("ucxx") is not None
TARGETS = {  # id: (backend, token, file descriptor limit)
    "tcp": ("tcp", TOKEN, 256),
    "tcp-open": ("tcp", None, 256),
    "cma": ("cma", TOKEN, None),
    "ucx": ("ucx", TOKEN, None),
    "auto": ("auto", TOKEN, None),
}
MEMORY_GROWTH_KB = 256 * 1024  # peak resident growth allowed over the whole fuzzing of one target


@pytest.fixture(scope="module")
def targets() -> Iterator[dict[str, Target]]:
    """Every target starts at once (each imports torch: most of this file's time)."""
    started = {
        name: Target(backend, token, nofile)
        for name, (backend, token, nofile) in TARGETS.items()
        if backend != "ucx" or HAS_UCX
    }
    try:
        yield started
    finally:
        for target in started.values():
            target.kill()


@pytest.fixture(scope="module", params=list(TARGETS))
def target(request: pytest.FixtureRequest, targets: dict[str, Target]) -> Target:
    """One target, with its legitimate receiver started and one room served."""
    if request.param not in targets:
        pytest.skip("ucxx is not installed")
    t = targets[request.param]
    if t.receiver is None:
        config = peer_module.config(t.backend, t.token, TARGET_TIMEOUT_S)
        t.receiver = TransferEngine(config, peer_module.make_pools("float32", None), FINGERPRINT).start()
        legit_room(t)
        t.baseline = t.stats()
    return t


@pytest.fixture(scope="module")
def loris(target: Target) -> Iterator[SlowLoris]:
    slow = SlowLoris(target)
    yield slow
    slow.close()


def _hostile(target: Target, frames: list[bytes], handshake: bool, hello_first: bool = False) -> None:
    """Send `frames` after the whole handshake, or after our Hello alone (`hello_first`), or first."""
    with RawPeer(target) as peer:
        if handshake:
            peer.handshake()
        elif hello_first:
            peer.send(message_frame(peer.hello()))
        for data in frames:
            if not peer.send(data):
                break
        peer.finish()
    target.check_alive()


# ---- generated ------------------------------------------------------------------------------------
@fuzz_settings(15)
@given(frames=st.lists(hostile_frame(ALL_KINDS), min_size=1, max_size=3), hello_first=st.booleans())
def test_generated_frames_before_the_handshake(
    target: Target, loris: SlowLoris, frames: list[bytes], hello_first: bool
) -> None:
    _hostile(target, frames, handshake=False, hello_first=hello_first)


@fuzz_settings(25)
@given(frames=st.lists(hostile_frame([*ROOM_KINDS, "hello", "hello_proof"]), min_size=1, max_size=4))
def test_generated_frames_after_the_handshake(target: Target, frames: list[bytes]) -> None:
    _hostile(target, frames, handshake=True)


# ---- hand-written ---------------------------------------------------------------------------------
def _request(room: int, pages: list[int] | None = None, tokens: int = 4) -> RoomRequest:
    return RoomRequest(room, FINGERPRINT, [0, 1] if pages is None else pages, tokens, "h")


def _data(room: int, **changes: object) -> Data:
    base = dict(room=room, seq=0, layers=[0, 3], runs=[[0, 1]], nbytes=3 * 2 * 512 * 4, staged=False)
    return Data(**{**base, **changes})  # type: ignore[arg-type]


FRAMING = {
    "header-len-zero": frame(b"", header_len=0),
    "header-len-2^31": frame(b"{}", header_len=2**31),
    "header-len-max-u32": frame(b"{}", header_len=2**32 - 1),
    "header-len-at-limit": frame(b'{"t":', header_len=MAX_HEADER_BYTES),
    "payload-len-max-u64": frame(header_bytes({"t": "finish_ack", "room": 1}), payload_len=U64 - 1),
    "truncated-prefix": frame(b"")[:5],
    "truncated-header": frame(header_bytes({"t": "room_accept", "room": 1}))[:-3],
    "garbage-header": frame(b"\xff\xfe\x00garbage"),
    "json-not-object": frame(b"[1, 2, 3]"),
    "json-nan": frame(b'{"t": "finish_ack", "room": NaN}'),
    "deep-nesting": frame(b"[" * 5000 + b"]" * 5000),
    "int-past-u64": frame(b'{"t": "room_abort", "room": 18446744073709551616, "reason": "x"}'),
    "payload-on-abort": frame(header_bytes({"t": "room_abort", "room": 1, "reason": "x"}), b"\x00" * 64),
}


@pytest.mark.parametrize("handshake", [False, True], ids=["before", "after"])
def test_broken_framing(target: Target, handshake: bool) -> None:
    for name, data in FRAMING.items():
        try:
            _hostile(target, [data], handshake)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from None


def _out_of_order(target: Target) -> dict[str, tuple[bool, list[bytes]]]:
    """name: (handshake first, frames)"""
    hello = message_frame(hello_for(target))
    return {
        "request-before-hello": (False, [message_frame(_request(7))]),
        "data-before-hello": (False, [message_frame(_data(7), b"\x00" * 3072)]),
        "proof-without-hello": (False, [message_frame(HelloProof("tcp", "0" * 64))]),
        "reply-from-a-receiver": (False, [message_frame(HelloReply(True, None, "h", 1))]),
        "request-between-hello-and-proof": (False, [hello, message_frame(_request(7))]),
        "second-hello": (True, [hello]),
        "second-proof": (True, [message_frame(HelloProof("tcp", "0" * 64))]),
        "choice-not-offered": (False, [hello, message_frame(HelloProof("rdma", "0" * 64))]),
        "no-choice": (False, [hello, message_frame(HelloProof(None, None, "x" * 10000))]),
        "data-unknown-room": (True, [message_frame(_data(7), b"\x00" * 3072)]),
        "data-on-the-sender-side": (
            True,
            [message_frame(_request(8)), message_frame(_data(8), b"\x00" * 3072)],
        ),
        "finish-without-data": (True, [message_frame(Finish(9, 1, None, 0, 0))]),
        "finish-ack-unknown": (True, [message_frame(FinishAck(9))]),
        "accept-to-the-sender": (True, [message_frame(RoomAccept(9))]),
        "abort-unknown": (True, [message_frame(RoomAbort(9, "x" * 10000))]),
        "duplicate-request": (True, [message_frame(_request(10)), message_frame(_request(10))]),
        "request-then-abort": (True, [message_frame(_request(11)), message_frame(RoomAbort(11, "bye"))]),
        "request-many-pages": (True, [message_frame(_request(12, list(range(100_000)), 4))]),
        "request-negative-pages": (True, [message_frame(_request(13, [-1, -2], 4))]),
        "request-huge-tokens": (True, [message_frame(_request(14, [0], 2**62))]),
        "data-huge-layers": (True, [message_frame(_data(15, layers=[0, 2**40], parts=2))]),
        "data-huge-nbytes": (True, [message_frame(_data(15, nbytes=2**62, staged=True))]),
        "data-parts-huge": (True, [message_frame(_data(15, parts=10**9, tag=1))]),
    }


def test_messages_out_of_order(target: Target) -> None:
    for name, (handshake, frames) in _out_of_order(target).items():
        try:
            _hostile(target, frames, handshake)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from None


class SlowLoris:
    """Silent peers and one that dribbles its Hello a byte every 50 ms, opened when a target's tests
    begin and checked by test_slow_loris_is_cut: the target's connect_timeout runs out meanwhile."""

    def __init__(self, target: Target) -> None:
        self.peers = [RawPeer(target) for _ in range(4)]
        self.hello = message_frame(hello_for(target))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._dribble, daemon=True)
        self.thread.start()

    def _dribble(self) -> None:
        dribbler = self.peers[-1]
        for i in range(len(self.hello)):
            if self.stop.wait(0.05) or not dribbler.send(self.hello[i : i + 1]):
                return

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        for peer in self.peers:
            peer.sock.close()


def test_slow_loris_is_cut_within_connect_timeout(target: Target, loris: SlowLoris) -> None:
    """Connected before the tests above, they sent nothing or a Hello too slowly: each is cut once
    connect_timeout passed (the deadline here is far above it: a check that the cut happens)."""
    try:
        for peer in loris.peers:
            peer.drain(timeout=TARGET_TIMEOUT_S + READ_TIMEOUT_S)
    finally:
        loris.close()
    target.check_alive()
    legit_room(target)


def test_headers_claiming_much_memory_before_the_handshake(target: Target) -> None:
    """Many peers announce the largest header allowed and send nothing more: the target must not
    reserve that memory for each of them."""
    before = target.stats()["hwm_kb"]
    peers = [RawPeer(target) for _ in range(12)]
    try:
        for peer in peers:
            peer.send(frame(b'{"t": "hello"', header_len=MAX_HEADER_BYTES))
        for peer in peers:  # closed at once, or at connect_timeout: either way the prefix was read
            peer.drain(timeout=TARGET_TIMEOUT_S + READ_TIMEOUT_S)
        grown = target.stats()["hwm_kb"] - before
        assert grown < 128 * 1024, f"peak memory grew by {grown} kB for 12 unfinished headers"
    finally:
        for peer in peers:
            peer.sock.close()
    target.check_alive()


def test_a_connection_flood_past_the_descriptor_limit(target: Target) -> None:
    """More connections than the target has file descriptors: it keeps accepting once they are gone."""
    if TARGETS[_name(target)][2] is None:
        pytest.skip("only the tcp targets run with a low descriptor limit")
    flood = []
    try:
        for _ in range(300):
            try:
                flood.append(socket.create_connection(("127.0.0.1", target.port), timeout=5))
            except OSError:
                break
        time.sleep(0.3)  # the target meets EMFILE on accept meanwhile
    finally:
        for s in flood:
            s.close()
    target.check_alive()
    wait_settled(target, connections=1)
    with RawPeer(target) as peer:  # a new connection is accepted and answered
        peer.handshake()
    legit_room(target)


def _name(target: Target) -> str:
    return next(n for n, (b, t, _) in TARGETS.items() if (b, t) == (target.backend, target.token))


def test_a_ucx_worker_address_of_an_unknown_format_is_refused(target: Target) -> None:
    """A Hello whose worker address starts with an unknown format byte (0x5a): before, it was
    accepted, and once its peer had proved the token and claimed a live room, the first send made
    UCX assert in ucp_address_unpack and abort the prefill process. Now refused in the Hello."""
    if target.backend != "ucx":
        pytest.skip("ucx only")
    hello = hello_for(target)
    with RawPeer(target) as peer:
        peer.send(message_frame(Hello(**{**hello.__dict__, "ucx_address": "0000abcd:" + "5a" * 64})))
        reply = peer.read_message()
        assert isinstance(reply, HelloReply) and not reply.ok and "unknown format" in (reply.reason or "")
    target.check_alive()


@pytest.fixture(scope="module")
def fake_sender(target: Target) -> Iterator[FakeSender]:
    sender = FakeSender(target)
    yield sender
    sender.close()


@fuzz_settings(12)
@given(data=st.data())
def test_hostile_sender_frames_to_a_receiving_target(
    target: Target, fake_sender: FakeSender, data: st.DataObject
) -> None:
    """The target as a decode-side receiver of a sender that sends fuzzed frames for its room: the room
    ends (Failed, or Success if the frames happened to be right) and the target goes on."""
    if target.backend == "ucx":
        pytest.skip("a ucx receiver would wait transfer_timeout for tag messages nobody sends")
    room, dst = target.new_room(), [5, 6, 7]
    frames = data.draw(
        st.lists(
            st.one_of(
                hostile_frame(ROOM_KINDS, room),
                near_data(target.plane, room, dst),
                st.just(message_frame(Finish(room, 1, None, 1, 3 * 2 * 3 * PAGE_BYTES))),
            ),
            min_size=1,
            max_size=3,
        )
    )
    with fake_sender.open_room(room, dst) as conn:
        for chunk in frames:
            try:
                conn.sendall(chunk)
            except OSError:
                break
    wait_room_terminal(target, room)
    wait_settled(target, connections=1)  # our connection gone; the legitimate receiver's stays


def test_target_healthy_afterwards(target: Target) -> None:
    """Last for each target: alive, a legitimate room byte for byte, nothing held, memory bounded,
    no traceback in its log."""
    target.check_clean()
    with RawPeer(target) as peer:  # still accepts new connections
        peer.handshake()
    legit_room(target)
    facts = wait_settled(target, connections=1)  # the legitimate receiver's connection stays open
    grown = facts["hwm_kb"] - target.baseline["hwm_kb"]
    assert grown < MEMORY_GROWTH_KB, f"peak memory grew by {grown} kB: {facts}"
    assert facts["fds"] <= target.baseline["fds"] + 4, facts
