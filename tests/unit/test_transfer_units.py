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

from pd_serve.transfer import (
    LayoutFingerprint,
    RoomState,
    TransferConfig,
    TransferConfigError,
    TransferEngine,
)
from pd_serve.transfer.cma_plane import iovecs, read_remote, split_by_bytes
from pd_serve.transfer.handshake import new_nonce, proof, proof_matches, token_setting_refusal
from pd_serve.transfer.layout import PoolSet, Run, coalesce, expand, should_stage
from pd_serve.transfer.messages import (
    PROTOCOL_VERSION,
    Data,
    Finish,
    Hello,
    MessageError,
    RoomRequest,
    decode,
    encode,
)
from pd_serve.transfer.node import Node
from pd_serve.transfer.plane import TcpPlane
from pd_serve.transfer.room import Destination, Room

FP = LayoutFingerprint("llama", 2, 2, 8, "float32", 4, "abc")


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
    other = LayoutFingerprint.from_value({**FP.to_dict(), "num_kv_heads": 4})
    assert "num_kv_heads" in (FP.mismatch(other) or "")
    assert FP.mismatch(LayoutFingerprint.from_value(FP.to_dict())) is None
    assert LayoutFingerprint.from_value({**FP.to_dict(), "dtype": torch.float32}).dtype == "float32"
    with pytest.raises(TransferConfigError, match="page_size"):
        LayoutFingerprint.from_value({k: v for k, v in FP.to_dict().items() if k != "page_size"})


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


def test_handshake_proofs_are_bound_to_direction_nonces_and_token() -> None:
    hello = Hello(PROTOCOL_VERSION, "tcp", True, new_nonce(), "host-r", 1)
    nonce = new_nonce()
    sender = proof("tok", "sender", hello, nonce, "host-s")
    assert len(nonce) == 64 and nonce != new_nonce()
    assert proof_matches("tok", "sender", hello, nonce, "host-s", sender)
    assert not proof_matches("tok", "receiver", hello, nonce, "host-s", sender)  # no reflection
    assert not proof_matches("tok", "sender", hello, new_nonce(), "host-s", sender)  # no replay
    assert not proof_matches("tok", "sender", hello, nonce, "host-x", sender)
    assert not proof_matches("tok2", "sender", hello, nonce, "host-s", sender)
    assert not proof_matches("tok", "sender", hello, "short", "host-s", sender)
    assert not proof_matches("tok", "sender", hello, nonce, "host-s", None)
    assert not proof_matches("tok", "sender", hello, nonce, "host-s", "\u00e9" * 64)  # non-ascii: False
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
    fresh = Room(2, "sender", TransferConfig(bootstrap_timeout=0.01))
    assert fresh.expired(time.monotonic() + 1) and "bootstrap_timeout" in fresh.timeout_reason()


def test_failed_room_reports_transferring_while_a_write_is_in_flight() -> None:
    room = Room(1, "receiver", TransferConfig())
    room.inflight_writes = 1
    room.fail("peer died")
    assert room.visible_state is RoomState.TRANSFERRING
    room.inflight_writes = 0
    assert room.visible_state is RoomState.FAILED


class _FakeConn:
    outbound, closed, peer = True, False, "fake"

    def __init__(self) -> None:
        self.discarded = 0
        self.rooms: set[int] = set()

    async def discard(self, n: int) -> None:
        self.discarded += n


def test_message_for_unknown_room_is_dropped_and_counted() -> None:
    node = Node(TransferConfig(), PoolSet(pools(), FP), TcpPlane(TransferConfig()))
    conn: Any = _FakeConn()
    data = Data(room=99, seq=0, layers=[0, 2], runs=[[0, 1]], nbytes=2048, staged=False)
    asyncio.run(node.on_room_message(conn, data, 2048))
    asyncio.run(node.on_room_message(conn, Finish(99, 1, None, 1, 2048), 0))
    assert node.stats == Counter({"dropped_messages": 2, "dropped_data": 1, "dropped_finish": 1})
    assert conn.discarded == 2048


def test_request_refusals_name_the_reason() -> None:
    node = Node(TransferConfig(), PoolSet(pools(), FP), TcpPlane(TransferConfig()))
    good = RoomRequest(5, FP.to_dict(), [0, 1], 8, "h")
    assert node._request_refusal(good) is None
    assert "head_dim" in (
        node._request_refusal(RoomRequest(5, {**FP.to_dict(), "head_dim": 4}, [0], 4, "h")) or ""
    )
    assert "expected_tokens" in (node._request_refusal(RoomRequest(5, FP.to_dict(), [0], 8, "h")) or "")
    node.finished[5] = None
    assert "duplicate" in (node._request_refusal(good) or "")


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
