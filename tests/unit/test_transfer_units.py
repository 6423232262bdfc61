"""In-process tests of the transfer layer's values and pure logic (no network, milliseconds)."""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from typing import Any

import numpy as np
import pytest
import torch

from pd_serve.kv_layout import LayoutError
from pd_serve.transfer import (
    KVLayout,
    RoomState,
    TransferConfig,
    TransferConfigError,
    TransferEngine,
)
from pd_serve.transfer.auth import new_nonce, proof, proof_matches, token_setting_refusal
from pd_serve.transfer.cma_plane import iovecs, read_remote, split_by_bytes
from pd_serve.transfer.layout import PoolSet, Run, coalesce, expand, should_stage
from pd_serve.transfer.loop import TransferLoop
from pd_serve.transfer.messages import (
    PROTOCOL_VERSION,
    Data,
    Finish,
    Hello,
    MessageError,
    RoomAbort,
    RoomRequest,
    decode,
    encode,
)
from pd_serve.transfer.plane import TcpPlane
from pd_serve.transfer.room import Destination, Room

FP = KVLayout("llama", 2, 2, 8, "float32", 4, "abc")


def pools(n_pages: int = 8, dtype: torch.dtype = torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [
        (torch.zeros(n_pages, 4, 2, 8, dtype=dtype), torch.zeros(n_pages, 4, 2, 8, dtype=dtype))
        for _ in range(2)
    ]


def test_config_errors_name_the_field() -> None:
    with pytest.raises(TransferConfigError, match="backend"):
        TransferConfig(backend="rdma")
    with pytest.raises(TransferConfigError, match="transfer_timeout"):
        TransferConfig(transfer_timeout=0)
    with pytest.raises(TransferConfigError, match="token"):
        TransferConfig(token="")
    assert TransferConfig().timeout_for(RoomState.SUCCESS) is None


def test_fingerprint_mismatch_names_the_field() -> None:
    other = KVLayout.from_value({**FP.to_dict(), "num_kv_heads": 4})
    assert "num_kv_heads" in (FP.mismatch(other) or "")
    assert FP.mismatch(KVLayout.from_value(FP.to_dict())) is None
    assert KVLayout.from_value({**FP.to_dict(), "dtype": torch.float32}).dtype == "float32"
    with pytest.raises(LayoutError, match="page_size"):
        KVLayout.from_value({k: v for k, v in FP.to_dict().items() if k != "page_size"})


def test_pools_must_match_the_fingerprint() -> None:
    with pytest.raises(ValueError, match="dtype"):
        PoolSet(pools(dtype=torch.bfloat16), FP)
    with pytest.raises(ValueError, match="layers"):
        PoolSet(pools()[:1], FP)


def test_coalesce_merges_runs_contiguous_on_both_sides() -> None:
    assert coalesce([1, 2, 3, 7], [10, 11, 12, 13]) == [Run(1, 10, 3), Run(7, 13, 1)]
    assert coalesce([5, 4], [0, 1]) == [Run(5, 0, 1), Run(4, 1, 1)]
    assert coalesce([1, 2, 3], [1, 2, 3], max_pages=2) == [Run(1, 1, 2), Run(3, 3, 1)]
    assert expand([[3, 2], [9, 1]]) == [3, 4, 9]
    assert should_stage([Run(0, 0, 1), Run(5, 5, 1)], page_bytes=1024, min_run_bytes=4096)
    assert not should_stage([Run(0, 0, 64)], page_bytes=1024, min_run_bytes=4096)


def test_gather_then_scatter_round_trips() -> None:
    src, dst = PoolSet(pools(), FP), PoolSet(pools(), FP)
    for k, v in src.pools:
        k.copy_(torch.randn_like(k))
        v.copy_(torch.randn_like(v))
    staging = src.gather(range(2), [6, 1, 3], src.staging(range(2), 3))
    dst.scatter(staging, range(2), [0, 7, 2])
    assert torch.equal(dst.pools[1][1][[0, 7, 2]], src.pools[1][1][[6, 1, 3]])


def test_cma_regions_read_pages_in_wire_order() -> None:
    src, dst = PoolSet(pools(), FP), PoolSet(pools(), FP)
    for k, v in src.pools:
        k.copy_(torch.randn_like(k))
        v.copy_(torch.randn_like(v))
    remote = iovecs(*src.regions(src.bases(range(1, 2)), [5, 0], [2, 1]))
    local = iovecs(*dst.regions(dst.bases(range(1, 2)), [1, 7], [2, 1]))
    assert read_remote(os.getpid(), local, remote)
    assert torch.equal(dst.pools[1][0][[1, 2, 7]], src.pools[1][0][[5, 6, 0]])
    assert torch.equal(dst.pools[1][1][[1, 2, 7]], src.pools[1][1][[5, 6, 0]])
    assert not dst.pools[0][0].any()


def test_split_by_bytes_balances_without_cutting_an_iovec() -> None:
    assert split_by_bytes(4, np.array([4, 4, 4, 4]), 2) == [(0, 2), (2, 4)]
    assert split_by_bytes(1, np.array([9]), 2) == [(0, 1)]
    assert split_by_bytes(0, np.array([], dtype=np.uint64), 2) == []


def test_staging_buffers_are_reused() -> None:
    ps = PoolSet(pools(64), FP)
    first = ps.staging(range(2), 3)
    ps.release(first)
    again = ps.staging(range(1), 2)
    assert again.data_ptr() == first.data_ptr() and again.shape == (2, 2, 4, 2, 8)


def test_staging_cache_counts_whole_allocations_and_stays_bounded() -> None:
    ps = PoolSet(pools(64), FP)  # 64 pages x 2 layers x (K, V): the cache keeps at most 1/8 of that
    page_bytes = 4 * 2 * 8 * 4
    assert ps.staging_cache_bytes == 64 * 2 * 2 * page_bytes // 8
    big = ps.staging(range(2), 8)  # 32 page-sized units: the whole cache
    ps.release(big)
    small = ps.staging(range(1), 1)  # a view of the big buffer
    ps.release(small)  # gives back the whole allocation, counted in full
    for _ in range(20):  # rooms of many sizes: what is cached never passes the bound
        bufs = [ps.staging(range(2), n) for n in (1, 2, 5, 3)]
        for b in bufs:
            ps.release(b)
        assert sum(b.numel() * b.element_size() for b in ps._free) <= ps.staging_cache_bytes
    first, second = ps.staging(range(1), 1), ps.staging(range(1), 1)
    assert first.data_ptr() != second.data_ptr()  # two live buffers never share memory


def test_codec_round_trips_and_rejects_garbage() -> None:
    msg = Data(room=2**62, seq=1, layers=[0, 2], runs=[[1, 2]], nbytes=64, staged=False, tag=5, parts=2)
    frame = encode(msg)
    assert decode(frame[12:]) == msg
    assert decode(encode(Finish(3, 7, {"a": -1.0}, 1, 64))[12:]) == Finish(3, 7, {"a": -1.0}, 1, 64)
    with pytest.raises(MessageError):
        decode(b'{"t": "nope"}')
    with pytest.raises(MessageError):
        decode(b"not json")


def test_a_hello_of_another_protocol_version_says_so() -> None:
    v1 = b'{"t": "hello", "version": 1, "backend": "tcp", "token": "x", "host_id": "h", "pid": 1}'
    with pytest.raises(MessageError, match="protocol version 1, this engine"):
        decode(v1)


def test_handshake_proofs_are_bound_to_direction_nonces_token_offers_and_choice() -> None:
    hello = Hello(PROTOCOL_VERSION, ["cma", "tcp"], True, new_nonce(), "host-r", 1)
    nonce = new_nonce()
    sender = proof("tok", "sender", hello, nonce, "host-s", ["cma", "tcp"], "")
    assert len(nonce) == 64 and nonce != new_nonce()
    assert proof_matches("tok", "sender", hello, nonce, "host-s", ["cma", "tcp"], "", sender)
    # no reflection, no replay
    assert not proof_matches("tok", "receiver", hello, nonce, "host-s", ["cma", "tcp"], "", sender)
    assert not proof_matches("tok", "sender", hello, new_nonce(), "host-s", ["cma", "tcp"], "", sender)
    assert not proof_matches("tok", "sender", hello, nonce, "host-x", ["cma", "tcp"], "", sender)
    assert not proof_matches("tok2", "sender", hello, nonce, "host-s", ["cma", "tcp"], "", sender)
    assert not proof_matches("tok", "sender", hello, "short", "host-s", ["cma", "tcp"], "", sender)
    assert not proof_matches("tok", "sender", hello, nonce, "host-s", ["cma", "tcp"], "", None)
    assert not proof_matches("tok", "sender", hello, nonce, "host-s", ["cma", "tcp"], "", "\u00e9" * 64)
    # nobody between the two may steer the choice: a changed offer, either way, or choice fails
    assert not proof_matches("tok", "sender", hello, nonce, "host-s", ["tcp"], "", sender)
    stripped = Hello(PROTOCOL_VERSION, ["tcp"], True, hello.nonce, "host-r", 1)
    assert not proof_matches("tok", "sender", stripped, nonce, "host-s", ["cma", "tcp"], "", sender)
    receiver = proof("tok", "receiver", hello, nonce, "host-s", ["cma", "tcp"], "cma")
    assert not proof_matches("tok", "receiver", hello, nonce, "host-s", ["cma", "tcp"], "tcp", receiver)
    assert token_setting_refusal(True, True) is None and token_setting_refusal(False, False) is None
    assert "the sender side has none, the receiver side has a cluster token" in (
        token_setting_refusal(False, True) or ""
    )


def test_room_moves_forward_only_and_times_out() -> None:
    room = Room(1, "receiver", TransferConfig(bootstrap_timeout=0.01))
    room.advance(RoomState.TRANSFERRING)
    room.advance(RoomState.WAITING_FOR_INPUT)
    assert room.state is RoomState.TRANSFERRING
    assert room.fail("x") and not room.fail("y") and room.failure_reason == "x"
    room.advance(RoomState.SUCCESS)
    assert room.state is RoomState.FAILED
    fresh = Room(2, "receiver", TransferConfig(bootstrap_timeout=0.01))
    assert fresh.expired(time.monotonic() + 1) and "bootstrap_timeout" in fresh.timeout_reason()


def test_a_sender_waits_for_admission_under_the_queue_timeout_not_the_bootstrap_timeout() -> None:
    """A prefill room waiting for the decode node to admit it is queued, not stalled (issue 19)."""
    config = TransferConfig(bootstrap_timeout=0.01, queue_timeout=60.0)
    sender = Room(3, "sender", config)
    assert not sender.expired(time.monotonic() + 1)
    assert sender.expired(time.monotonic() + 61) and "queue_timeout" in sender.timeout_reason()
    sender.advance(RoomState.WAITING_FOR_INPUT)  # admitted: the room timeouts apply from here
    assert sender.deadline < time.monotonic() + config.waiting_timeout + 1


def test_failed_room_reports_transferring_while_a_write_is_in_flight() -> None:
    room = Room(1, "receiver", TransferConfig())
    room.inflight_writes = 1
    room.fail("peer died")
    assert room.visible_state is RoomState.TRANSFERRING
    room.inflight_writes = 0
    assert room.visible_state is RoomState.FAILED


class _FakeConn:
    outbound, closed, peer = True, False, "fake"
    plane: Any = None

    def __init__(self) -> None:
        self.discarded = 0
        self.rooms: set[int] = set()

    async def discard(self, n: int) -> None:
        self.discarded += n


def test_message_for_unknown_room_is_dropped_and_counted() -> None:
    transfer = TransferLoop(TransferConfig(), PoolSet(pools(), FP), [TcpPlane(TransferConfig())])
    conn: Any = _FakeConn()
    conn.plane = transfer.planes["tcp"]
    data = Data(room=99, seq=0, layers=[0, 2], runs=[[0, 1]], nbytes=1024, staged=False)
    asyncio.run(transfer.receive.on_message(conn, data, 1024))
    asyncio.run(transfer.receive.on_message(conn, Finish(99, 1, None, 1, 1024), 0))
    assert transfer.stats == Counter({"dropped_messages": 2, "dropped_data": 1, "dropped_finish": 1})
    assert conn.discarded == 1024


def test_request_refusals_name_the_reason() -> None:
    transfer = TransferLoop(TransferConfig(), PoolSet(pools(), FP), [TcpPlane(TransferConfig())])
    good = RoomRequest(5, FP.to_dict(), [0, 1], 8, "h")
    assert transfer.send._request_refusal(good) is None
    assert "head_dim" in (
        transfer.send._request_refusal(RoomRequest(5, {**FP.to_dict(), "head_dim": 4}, [0], 4, "h")) or ""
    )
    assert "expected_tokens" in (
        transfer.send._request_refusal(RoomRequest(5, FP.to_dict(), [0], 8, "h")) or ""
    )
    # held until the sender exists: never more pages than a prompt that fits this pool can need
    assert "more than this sender's 8" in (
        transfer.send._request_refusal(RoomRequest(5, FP.to_dict(), list(range(9)), 4, "h")) or ""
    )
    assert "negative" in (transfer.send._request_refusal(RoomRequest(5, FP.to_dict(), [-1], 4, "h")) or "")
    transfer.rooms.finished[5] = None
    assert "duplicate" in (transfer.send._request_refusal(good) or "")


def test_handles_refuse_caller_mistakes() -> None:
    with TransferEngine(TransferConfig(backend="tcp"), pools(), FP) as engine:
        tx = engine.sender(1)
        with pytest.raises(RuntimeError, match="destination not known"):
            tx.send([0])
        with pytest.raises(ValueError, match="duplicate room"):
            engine.sender(1)
        with pytest.raises(ValueError, match="dst_page_ids"):
            engine.receiver(2, engine.endpoint, [0, 99], 4, "h")
        with pytest.raises(ValueError, match="expected_tokens"):
            engine.receiver(3, engine.endpoint, [0], 9, "h")
        tx._room.destination = Destination([0, 1], 8, "h")
        with pytest.raises(ValueError, match="do not fit"):
            tx.send([0, 1, 2])
        with pytest.raises(ValueError, match="layers"):
            tx.send([0], layers=(1, 5))
        assert engine.endpoint.startswith("tcp://127.0.0.1:")


# ---- regressions found by fuzzing the transfer port (tests/fuzz/test_fuzz_transfer.py) -----------


@pytest.mark.parametrize(
    "header",
    [
        b'{"t": "finish_ack", "room": 18446744073709551616}',  # past 64 bits: orjson makes it a float
        b'{"t": "finish_ack", "room": 1.0}',
        b'{"t": "finish_ack", "room": true}',
        b'{"t": "room_abort", "room": 1, "reason": 5}',
        b'{"t": "data", "room": 1, "seq": 0, "layers": [0, "2"], "runs": [], "nbytes": 0, "staged": false}',
        b'{"t": "data", "room": 1, "seq": 0, "layers": [0, 2], "runs": [[0, 1.5]], "nbytes": 0, "staged": 0}',
        b'{"t": "room_request", "room": 1, "fingerprint": [], "dst_page_ids": "ab", "expected_tokens": 4, "prompt_hash": "h"}',
        b'{"t": "hello", "version": 3, "backends": ["ucx"], "auth": true, "nonce": "00", "host_id": "h", "pid": 1, "ucx_address": 7}',
        b'{"t": "hello", "version": 3, "backends": "tcp", "auth": true, "nonce": "00", "host_id": "h", "pid": 1}',
        b'{"t": "hello_reply", "ok": true, "reason": null, "host_id": "h", "pid": 1, "probe": [0, "x", 0]}',
        b'{"t": "finish", "room": 1, "first_token": "7", "first_token_logprobs": null, "data_messages": 0, "nbytes": 0}',
    ],
)
def test_decode_refuses_fields_of_the_wrong_type(header: bytes) -> None:
    """Before, any JSON value reached the handlers: a float room id, a string page list (its
    characters became page ids) or an int-typed ucx address raised deep inside the engine."""
    with pytest.raises(MessageError, match="is not"):
        decode(header)


def test_decode_keeps_any_json_in_logprobs_and_64_bit_ints() -> None:
    finish = decode(encode(Finish(2**63 + 5, 7, [[-0.5, [[1, -1.0]]]], 0, 0))[12:])
    assert isinstance(finish, Finish) and finish.room == 2**63 + 5


class _Sock:
    """Both ends of a loopback TCP connection, the near one wrapped in a Connection."""

    @staticmethod
    async def reader_error(raw: bytes, handshaken: bool) -> BaseException | None:
        import socket as socket_mod

        from pd_serve.transfer.connection import Connection

        with socket_mod.create_server(("127.0.0.1", 0)) as listener:  # TCP: Connection sets TCP_NODELAY
            far = socket_mod.create_connection(listener.getsockname(), timeout=10)
            near, _ = listener.accept()
        conn = Connection(near, "test", outbound=False, chunk_bytes=4096)
        conn.hello = object() if handshaken else None
        far.sendall(raw)
        far.shutdown(socket_mod.SHUT_WR)

        async def handler(*_: Any) -> None:
            return None

        try:
            await asyncio.wait_for(conn.run_reader(handler), 10)
        except BaseException as exc:  # noqa: BLE001 - the test looks at which one
            return exc
        finally:
            near.close()
            far.close()
        return None


def test_a_large_header_before_the_handshake_is_refused_without_allocating_it() -> None:
    """Before, each unauthenticated connection could make the engine allocate (and zero) up to
    64 MiB by announcing a large header; 12 such peers took 768 MiB of the prefill process."""
    from pd_serve.transfer.connection import ConnectionClosed
    from pd_serve.transfer.messages import FRAME_PREFIX, MAX_HANDSHAKE_HEADER_BYTES, MAX_HEADER_BYTES

    big = FRAME_PREFIX.pack(MAX_HANDSHAKE_HEADER_BYTES + 1, 0) + b"{"
    exc = asyncio.run(_Sock.reader_error(big, handshaken=False))
    assert isinstance(exc, MessageError) and "exceeds 65536" in str(exc)
    # after the handshake the limit is larger, and the header is held only as its bytes arrive
    exc = asyncio.run(_Sock.reader_error(FRAME_PREFIX.pack(MAX_HEADER_BYTES, 0) + b"{", handshaken=True))
    assert isinstance(exc, ConnectionClosed)


def _transfer(backend: str = "tcp") -> TransferLoop:
    from pd_serve.transfer.plane import new_plane

    config = TransferConfig(backend=backend)
    ps = PoolSet(pools(), FP)
    plane = new_plane(backend, config)
    plane.pools = ps
    return TransferLoop(config, ps, [plane])


@pytest.mark.parametrize(
    ("outbound", "msg", "payload", "match"),
    [
        (True, RoomAbort(1, "x"), 64, "payload"),  # its payload would have been read as frames
        (False, Data(1, 0, [0, 2], [[0, 1]], 1024, False), 1024, "a receiver"),  # Data to the sender
        (True, Data(1, 0, [0, 2**40], [[0, 1]], 1024, False, parts=2), 0, "layers"),  # 2**41-item list
        (True, Data(1, 0, [0, 2], [[0, 2**40]], 2**50, True), 2**50, "runs"),
        (True, Data(1, 0, [0, 2], [[0, 1]] * 9, 9 * 1024, True), 9 * 1024, "pages in all"),
        (True, Data(1, 0, [0, 2], [[0, 1]], 2**62, True), 2**62, "nbytes"),
        (True, Data(1, 0, [0, 2], [[0, 1]], 1024, False), 2**64 - 1, "payload of"),  # tcp: must be nbytes
    ],
)
def test_malformed_data_closes_the_connection_before_anything_is_read(
    outbound: bool, msg: Any, payload: int, match: str
) -> None:
    """Before, a Data for an unknown room was discarded by sizes taken from its own fields: layers
    [0, 2**40] with parts=2 built a list of 2**41 items (the process ran out of memory), a Data sent
    to the sender side hit a ucx endpoint that did not exist, and a RoomAbort with a payload
    desynchronised the stream."""
    transfer = _transfer()
    conn: Any = _FakeConn()
    conn.outbound, conn.hello, conn.plane = outbound, object(), transfer.planes["tcp"]
    with pytest.raises(MessageError, match=match):
        asyncio.run(transfer.handle(conn, msg, payload))
    assert conn.discarded == 0


def test_plane_specific_data_checks() -> None:
    cma = _transfer("cma").planes["cma"]
    good = Data(1, 0, [0, 2], [[0, 1]], 1024, False, src_base=[1, 2, 3, 4], src_starts=[0])
    assert cma.data_refusal(good, 0) is None
    assert "negative" in (cma.data_refusal(Data(**{**good.__dict__, "src_base": [-1, 2, 3, 4]}), 0) or "")
    assert "do not match" in (cma.data_refusal(Data(**{**good.__dict__, "src_starts": []}), 0) or "")
    from pd_serve.transfer.ucx_plane import UcxPlane

    ucx = UcxPlane(TransferConfig())
    tagged = Data(1, 0, [0, 2], [[0, 1], [4, 2]], 3 * 1024, False, tag=2**64 - 8, parts=8)
    assert ucx.data_refusal(tagged, 0) is None
    assert "parts" in (ucx.data_refusal(Data(**{**tagged.__dict__, "parts": 10**9}), 0) or "")
    assert "tag" in (ucx.data_refusal(Data(**{**tagged.__dict__, "tag": 2**64 - 7}), 0) or "")
    assert "tag" in (ucx.data_refusal(Data(**{**tagged.__dict__, "tag": None}), 0) or "")


@pytest.mark.parametrize(
    "address", ["1_0:00", "-5:00", " 10:00", "f" * 40 + ":00", "0000abcd:0", "0000abcd:zz"]
)
def test_a_ucx_hello_with_a_malformed_nonce_or_address_is_refused(address: str) -> None:
    """The nonce is the high 32 bits of every tag: before, int(..., 16) took '1_0', '-5' or 40
    digits, and the sender then made tags outside 64 bits (its sends failed in ucxx). An address
    whose first byte names an unknown format (0x5a) made UCX abort the process at the first send."""
    from pd_serve.transfer.ucx_plane import UcxPlane

    hello = Hello(PROTOCOL_VERSION, ["ucx"], True, new_nonce(), "h", 1, address)
    assert "ucx peer sent a" in (UcxPlane(TransferConfig()).refusal(hello) or "")
    ok = Hello(PROTOCOL_VERSION, ["ucx"], True, new_nonce(), "h", 1, "0000abcd:" + "20" * 64)
    assert UcxPlane(TransferConfig()).refusal(ok) is None
    conn: Any = _FakeConn()
    conn.outbound, conn.plane_state = False, None
    assert asyncio.run(UcxPlane(TransferConfig()).on_hello(conn, ok)) is None  # noted, not unpacked
    assert conn.plane_state.endpoint is None and conn.plane_state.nonce == 0xABCD


@pytest.mark.parametrize("probe", [None, [0, 2**40, 0], [0, 0, 0], [-1, 64, 0], [0, 64]])
def test_a_cma_probe_is_bounded(probe: Any) -> None:
    """Before, the receiver allocated the probe's length (2**40: MemoryError) and unpacked it
    without looking (a 2-item probe: ValueError)."""
    from pd_serve.transfer.handshake import host_id
    from pd_serve.transfer.messages import HelloReply

    conn: Any = _FakeConn()
    reply = HelloReply(True, None, host_id(), os.getpid(), probe=probe)
    assert "malformed probe" in (asyncio.run(_transfer("cma").planes["cma"].on_hello(conn, reply)) or "")


def test_a_peer_abort_reason_is_truncated() -> None:
    transfer = _transfer()
    conn: Any = _FakeConn()
    room = Room(3, "receiver", TransferConfig(), conn=conn)
    transfer.rooms.receivers[3] = room
    transfer.receive._on_abort(conn, RoomAbort(3, "x" * 100_000))
    assert room.state is RoomState.FAILED and len(room.failure_reason or "") < 600


def test_a_negative_first_token_fails_the_room() -> None:
    transfer = _transfer()
    conn: Any = _FakeConn()
    room = Room(4, "receiver", TransferConfig(), conn=conn, destination=Destination([0], 4, "h"))
    room.coverage = torch.ones((2, 1), dtype=torch.bool)
    transfer.rooms.receivers[4] = room
    conn.send_soon = lambda msg: None
    transfer.receive._on_finish(conn, room, Finish(4, -1, None, 0, 0))
    assert room.state is RoomState.FAILED and "first token -1" in (room.failure_reason or "")


def test_the_listener_survives_a_failed_accept() -> None:
    """Before, one OSError from accept (EMFILE under a flood of connections) ended the accept loop:
    the engine took no connection again, and every later room to it failed."""
    import errno
    import socket as socket_mod

    async def run() -> int:
        transfer = _transfer()
        loop = asyncio.get_running_loop()
        real, calls = loop.sock_accept, []

        async def flaky(sock: Any) -> Any:
            calls.append(1)
            if len(calls) == 1:
                raise OSError(errno.EMFILE, "Too many open files")
            return await real(sock)

        loop.sock_accept = flaky  # type: ignore[method-assign]
        lsock = socket_mod.create_server(("127.0.0.1", 0))
        lsock.setblocking(False)
        task = loop.create_task(transfer.serve(lsock))
        client = socket_mod.create_connection(lsock.getsockname(), timeout=5)
        for _ in range(200):
            if transfer.inbound:
                break
            await asyncio.sleep(0.01)
        accepted = len(transfer.inbound)
        task.cancel()
        client.close()
        lsock.close()
        await transfer.close()
        return accepted

    assert asyncio.run(run()) == 1


def test_an_unfinished_outbound_handshake_is_closed() -> None:
    """Before, a peer that accepted the connection and never answered the Hello kept it open after
    connect_timeout failed the room: one leaked connection per attempt."""
    import socket as socket_mod

    listener = socket_mod.create_server(("127.0.0.1", 0))
    config = TransferConfig(backend="tcp", connect_timeout=0.3)
    with TransferEngine(config, pools(), FP) as engine:
        rx = engine.receiver(5, f"tcp://127.0.0.1:{listener.getsockname()[1]}", [0], 4, "h")
        listener.settimeout(10)
        peer, _ = listener.accept()
        peer.settimeout(10)
        deadline = time.monotonic() + 10
        while rx.poll() is not RoomState.FAILED and time.monotonic() < deadline:
            time.sleep(0.01)
        assert rx.poll() is RoomState.FAILED
        data = b""
        while chunk := peer.recv(4096):  # the Hello, then EOF: the engine closed its side
            data += chunk
        assert data
        while engine.stats()["connections"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.stats()["connections"] == 0
        peer.close()
    listener.close()
