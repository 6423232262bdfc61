"""A prefill peer that stops in the middle of a Data payload (SIGSTOP, a hung host): the decode side's
room must fail after its transfer timeout and report Failed, so the engine frees its pages, instead of
staying Transferring for as long as the peer is stopped.

The peer is a raw socket speaking the transfer protocol (handshake, RoomAccept, a Data header and
half its payload, then silence): a real prefill engine cannot be stopped at that byte on purpose.
The decode side is a real `TransferEngine` over tcp.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch

from pd_serve.transfer import KVLayout, RoomState, TransferConfig, TransferEngine
from pd_serve.transfer.handshake import host_id
from pd_serve.transfer.messages import Data, HelloReply, RoomAccept, encode
from pd_serve.transfer.testing import read_frame

FP = KVLayout("llama", 2, 2, 8, "float32", 4, "abc")
PAGE_BYTES = 4 * 2 * 8 * 4  # page_size * heads * head_dim * float32
TIMEOUT_S = 1.0




def _stalling_peer(listener: socket.socket, closed: threading.Event) -> None:
    conn, _ = listener.accept()
    conn.settimeout(30)
    read_frame(conn)  # Hello
    conn.sendall(encode(HelloReply(True, None, host_id(), 1, backends=["tcp"])))
    read_frame(conn)  # HelloProof: the receiver's choice, tcp
    request = read_frame(conn)
    room = request.room  # type: ignore[attr-defined]
    conn.sendall(encode(RoomAccept(room)))
    nbytes = 2 * 2 * 2 * PAGE_BYTES  # 2 layers, K and V, destination pages 3 and 4
    header = Data(room=room, seq=0, layers=[0, 2], runs=[[3, 2]], nbytes=nbytes, staged=False)
    conn.sendall(encode(header, nbytes) + b"\0" * (nbytes // 2))  # then nothing: a stopped peer
    try:
        while conn.recv(4096):
            pass  # the decode side's RoomAbort, until it cuts the connection
    except OSError:
        pass
    closed.set()
    conn.close()


@pytest.mark.timeout(60)
def test_room_stuck_mid_payload_fails_and_the_connection_is_cut() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    closed = threading.Event()
    peer = threading.Thread(target=_stalling_peer, args=(listener, closed), daemon=True)
    peer.start()
    pools = [(torch.zeros(8, 4, 2, 8), torch.zeros(8, 4, 2, 8)) for _ in range(2)]
    config = TransferConfig(backend="tcp", transfer_timeout=TIMEOUT_S, waiting_timeout=TIMEOUT_S)
    with TransferEngine(config, pools, FP) as engine:
        endpoint = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
        receiver = engine.receiver(7, endpoint, [3, 4], 8, "hash")
        deadline = time.monotonic() + 20
        while receiver.poll() is not RoomState.FAILED:
            assert time.monotonic() < deadline, (
                f"room still {receiver.poll()} with the peer stalled mid-payload"
            )
            time.sleep(0.05)
        assert "timed out" in (receiver.failure_reason or "")
        assert closed.wait(10), "the stalled connection was not cut"
    listener.close()
