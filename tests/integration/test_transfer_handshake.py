"""The transfer handshake's mutual proof of the cluster token, on real engines over loopback tcp and
on raw peers speaking the protocol: the token crosses no wire, a captured proof is good for one
connection only, either end refuses a peer without the token, and no room message is taken before
the proof. Engines run in this process (one thread and loop each); every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import secrets
import socket
import threading

import pytest
import torch
from transfer_helpers import SMALL_LAYOUT, local_engine, until, wait_terminal

from pd_serve.transfer import RoomState, TransferEngine
from pd_serve.transfer.auth import new_nonce, proof
from pd_serve.transfer.handshake import host_id
from pd_serve.transfer.messages import (
    PROTOCOL_VERSION,
    Hello,
    HelloProof,
    HelloReply,
    Message,
    RoomRequest,
    encode,
)
from pd_serve.transfer.testing import read_frame, split_frames

TOKEN = "cluster-" + secrets.token_urlsafe(24)
WAIT_S = 2.0


def _engine(
    token: str | None,
    seed: int | None = None,
    connect_timeout: float = WAIT_S,
    backend: str = "tcp",
    bootstrap_timeout: float = WAIT_S,
) -> TransferEngine:
    return local_engine(backend, token, WAIT_S, seed, connect_timeout, bootstrap_timeout)


def _port(engine: TransferEngine) -> int:
    return int(engine.endpoint.rsplit(":", 1)[1])


def _closed(sock: socket.socket) -> bool:
    """True once the peer closed the connection (EOF or reset) with nothing more to read."""
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True


def _raw(engine: TransferEngine) -> socket.socket:
    return socket.create_connection(("127.0.0.1", _port(engine)), timeout=10)


def _hello(auth: bool) -> Hello:
    return Hello(PROTOCOL_VERSION, ["tcp"], auth, new_nonce(), host_id(), 1)


def _proof(token: str, hello: Hello, reply: HelloReply) -> str:
    """The receiver's proof for choosing tcp on the connection `hello` opened."""
    return proof(token, "receiver", hello, reply.nonce or "", reply.host_id, reply.backends or [], "tcp")


def _request(room: int) -> bytes:
    return encode(RoomRequest(room, SMALL_LAYOUT.to_dict(), [0, 1], 4, "h"))


class _Recorder:
    """A loopback tcp proxy for one connection that keeps every byte each way."""

    def __init__(self, target_port: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.up, self.down = bytearray(), bytearray()  # receiver -> sender, sender -> receiver
        self._target = target_port
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        self.listener.settimeout(20)
        a, _ = self.listener.accept()
        b = socket.create_connection(("127.0.0.1", self._target), timeout=20)
        a.settimeout(20)
        threading.Thread(target=self._pump, args=(a, b, self.up), daemon=True).start()
        self._pump(b, a, self.down)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, record: bytearray) -> None:
        try:
            while chunk := src.recv(65536):
                record += chunk
                dst.sendall(chunk)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


def test_the_token_never_crosses_the_wire_and_a_replayed_proof_is_refused() -> None:
    with _engine(TOKEN, seed=1) as prefill, _engine(TOKEN) as dec:
        proxy = _Recorder(_port(prefill))
        tx = prefill.sender(11)
        rx = dec.receiver(11, proxy.endpoint, [2, 3], expected_tokens=8, prompt_hash="h")
        assert until(lambda: tx.poll() is RoomState.WAITING_FOR_INPUT), tx.failure_reason
        tx.send([5, 6])
        tx.finish(7, None)
        assert wait_terminal([rx]) == [RoomState.SUCCESS], rx.failure_reason
        for layer in range(2):
            for kv in range(2):
                assert torch.equal(dec.pools.pools[layer][kv][[2, 3]], prefill.pools.pools[layer][kv][[5, 6]])

        wire = bytes(proxy.up + proxy.down)
        digest = hashlib.sha256(TOKEN.encode())
        for secret in (TOKEN.encode(), digest.hexdigest().encode(), digest.digest()):
            assert secret not in wire
        up, down = split_frames(bytes(proxy.up)), split_frames(bytes(proxy.down))
        assert [m.kind for m, _ in up[:3]] == ["hello", "hello_proof", "room_request"]
        assert [m.kind for m, _ in down[:2]] == ["hello_reply", "room_accept"]
        (hello, hello_raw), (_, proof_raw), (reply, _) = up[0], up[1], down[0]
        assert isinstance(hello, Hello) and hello.auth and isinstance(reply, HelloReply) and reply.proof

        # the captured Hello and proof, replayed on a new connection: the sender's nonce is fresh
        tx2 = prefill.sender(12)
        with _raw(prefill) as sock:
            sock.sendall(hello_raw)
            fresh = read_frame(sock)
            assert isinstance(fresh, HelloReply) and fresh.ok and fresh.nonce != reply.nonce
            sock.sendall(proof_raw + _request(12))
            refusal = read_frame(sock)
            assert isinstance(refusal, HelloReply) and not refusal.ok
            assert "receiver could not prove the cluster token" in (refusal.reason or "")
            assert TOKEN not in (refusal.reason or "")
            assert _closed(sock)
        assert tx2.poll() is RoomState.BOOTSTRAPPING and tx2.destination() is None
        stats = prefill.stats()
        assert stats["refused_connections"] == 1 and stats["pending_room_requests"] == 0
        tx2.abort()


@pytest.mark.parametrize("auth", [True, False])
def test_a_receiver_without_the_token_is_refused_by_the_sender(auth: bool) -> None:
    with _engine(TOKEN, seed=1) as prefill:
        tx = prefill.sender(21)
        with _raw(prefill) as sock:
            hello = _hello(auth)
            sock.sendall(encode(hello))
            reply = read_frame(sock)
            if auth:  # a proof made with another token, then a room request right behind it
                assert isinstance(reply, HelloReply) and reply.ok and reply.nonce
                forged = _proof("not-" + TOKEN, hello, reply)
                sock.sendall(encode(HelloProof("tcp", forged)) + _request(21))
                reply = read_frame(sock)
            assert isinstance(reply, HelloReply) and not reply.ok
            reason = reply.reason or ""
            expected = "receiver could not prove" if auth else "token setting differs"
            assert "cluster token does not match" in reason and expected in reason and TOKEN not in reason
            assert _closed(sock)
        assert tx.poll() is RoomState.BOOTSTRAPPING and tx.destination() is None
        assert prefill.stats()["refused_connections"] == 1
        assert prefill.stats()["pending_room_requests"] == 0
        tx.abort()


def test_a_ucx_sender_makes_no_endpoint_for_a_peer_that_has_not_proved_the_token() -> None:
    """The worker address in an unproved Hello is only noted, not handed to UCX.

    Before, the sender made its endpoint to that address while answering the Hello, and UCX aborts
    the whole process on a malformed one: one forged Hello killed a prefill node.
    """
    pytest.importorskip("ucxx")
    with _engine(TOKEN, seed=1, backend="ucx") as prefill:
        with _raw(prefill) as sock:
            # a known format byte (00: an address of another format is refused at once) over garbage
            hello = Hello(PROTOCOL_VERSION, ["ucx"], True, new_nonce(), host_id(), 1, "0000abcd:00" + "5a" * 63)
            sock.sendall(encode(hello))
            reply = read_frame(sock)
            assert isinstance(reply, HelloReply) and reply.ok and reply.nonce and reply.backends == ["ucx"], reply
            forged = proof("not-" + TOKEN, "receiver", hello, reply.nonce, reply.host_id, ["ucx"], "ucx")
            sock.sendall(encode(HelloProof("ucx", forged)))
            refusal = read_frame(sock)
            assert isinstance(refusal, HelloReply) and not refusal.ok
            assert "receiver could not prove the cluster token" in (refusal.reason or "")
            assert _closed(sock)
        assert prefill.stats()["refused_connections"] == 1


def test_a_refusal_quoting_a_huge_field_is_cut_in_the_log_and_the_answer(caplog: pytest.LogCaptureFixture) -> None:
    """An unauthenticated peer chooses the backend names a refusal quotes: it must not flood the log."""
    with caplog.at_level(logging.WARNING, logger="pd_serve.transfer"), _engine(TOKEN) as prefill:
        with _raw(prefill) as sock:
            hello = Hello(PROTOCOL_VERSION, ["x" * 60000], True, new_nonce(), host_id(), 1)
            sock.sendall(encode(hello))
            reply = read_frame(sock)
            assert isinstance(reply, HelloReply) and not reply.ok
            assert "no transfer backend in common" in (reply.reason or "") and len(reply.reason or "") < 400
            assert _closed(sock)
        assert prefill.stats()["refused_connections"] == 1
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1 and len(refusals[0]) < 500, [len(m) for m in refusals]


def _impostor(listener: socket.socket, token: str | None, received: list[Message]) -> None:
    """A sender that does not hold the cluster token: it answers with a forged proof (or none)."""
    listener.settimeout(20)
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(20)
        hello = read_frame(conn)
        assert isinstance(hello, Hello)
        received.append(hello)
        nonce = new_nonce()
        forged = proof(token, "sender", hello, nonce, host_id(), ["tcp"], "") if token else None
        conn.sendall(encode(HelloReply(True, None, host_id(), 1, nonce, forged, backends=["tcp"])))
        try:
            while True:
                received.append(read_frame(conn))
        except (ConnectionError, OSError):
            pass


@pytest.mark.parametrize("forged_with", ["not-the-token", None])
def test_a_sender_without_the_token_is_detected_by_the_receiver(
    forged_with: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    received: list[Message] = []
    peer = threading.Thread(target=_impostor, args=(listener, forged_with, received), daemon=True)
    peer.start()
    with caplog.at_level(logging.WARNING, logger="pd_serve.transfer"), _engine(TOKEN) as dec:
        endpoint = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
        rx = dec.receiver(31, endpoint, [2, 3], expected_tokens=8, prompt_hash="h")
        assert wait_terminal([rx]) == [RoomState.FAILED]
        reason = rx.failure_reason or ""
        assert "sender could not prove the cluster token" in reason and TOKEN not in reason
        assert dec.stats()["refused_connections"] == 1
        peer.join(10)
    # the impostor got the receiver's Hello and its refusal, never a proof or a room request
    assert [m.kind for m in received] == ["hello", "hello_proof"]
    assert isinstance(received[1], HelloProof) and received[1].proof is None and received[1].backend is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "could not prove" in warnings[0] and TOKEN not in warnings[0]
    listener.close()


@pytest.mark.parametrize(
    ("sender_token", "receiver_token"), [(TOKEN, None), (None, TOKEN)], ids=["sender-only", "receiver-only"]
)
def test_a_token_on_one_end_only_is_refused(sender_token: str | None, receiver_token: str | None) -> None:
    with _engine(sender_token, seed=1) as prefill, _engine(receiver_token) as dec:
        tx = prefill.sender(41)
        rx = dec.receiver(41, prefill.endpoint, [2, 3], expected_tokens=8, prompt_hash="h")
        assert wait_terminal([rx]) == [RoomState.FAILED]
        reason = rx.failure_reason or ""
        assert "token setting differs" in reason and TOKEN not in reason
        assert prefill.stats()["refused_connections"] == 1
        assert tx.poll() is RoomState.BOOTSTRAPPING and tx.destination() is None
        tx.abort()


def test_room_messages_before_the_proof_close_the_connection() -> None:
    with _engine(TOKEN, seed=1, connect_timeout=0.5) as prefill:
        tx = prefill.sender(51)
        with _raw(prefill) as sock:  # a room request as the very first frame
            sock.sendall(_request(51))
            assert _closed(sock)
        with _raw(prefill) as sock:  # after the Hello, before the proof
            sock.sendall(encode(_hello(True)))
            assert isinstance(read_frame(sock), HelloReply)
            sock.sendall(_request(51))
            assert _closed(sock)
        with _raw(prefill) as sock:  # a peer that says nothing is cut after connect_timeout
            assert _closed(sock)
        assert tx.poll() is RoomState.BOOTSTRAPPING and tx.destination() is None
        assert prefill.stats()["pending_room_requests"] == 0
        with _raw(prefill) as sock:  # the same peer, in order and with the token: accepted
            hello = _hello(True)
            sock.sendall(encode(hello))
            reply = read_frame(sock)
            assert isinstance(reply, HelloReply) and reply.ok and reply.nonce
            sock.sendall(encode(HelloProof("tcp", _proof(TOKEN, hello, reply))))
            sock.sendall(_request(51))
            assert read_frame(sock).kind == "room_accept"
            assert until(lambda: tx.poll() is RoomState.WAITING_FOR_INPUT)
        tx.abort()


def test_a_room_that_times_out_while_connecting_blames_the_endpoint() -> None:
    """A stale endpoint whose port another program took (a restarted engine's UCX listener accepts
    and never answers a Hello): before, the room failed as a plain BOOTSTRAPPING timeout, so the
    decode node neither blamed the prefill node (prefill_unreachable) nor looked its record up again.
    Now the reason starts with "cannot connect to", as a refused connection's does."""
    listener = socket.create_server(("127.0.0.1", 0))
    with _engine(None, connect_timeout=30.0, bootstrap_timeout=0.5) as dec:
        endpoint = f"auto://127.0.0.1:{listener.getsockname()[1]}"
        rx = dec.receiver(61, endpoint, [2, 3], expected_tokens=8, prompt_hash="h")
        assert wait_terminal([rx]) == [RoomState.FAILED]
        reason = rx.failure_reason or ""
        assert reason.startswith(f"cannot connect to {endpoint}") and "bootstrap_timeout" in reason, reason
    listener.close()
