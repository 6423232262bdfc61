"""Pieces of the transfer-port fuzz tests: the target process, a raw protocol peer, frame builders
and the strategies for hostile control frames.

The target is `tests/integration/transfer_peer.py`: a prefill-side TransferEngine in its own process
(so that a crash, even an abort inside UCX, is observed rather than fatal to pytest), driven by JSON
commands on stdin. Hostile peers are plain sockets in this process that speak the frame format by
hand (`[u32 header length][u64 payload length][header][payload]`, messages.py), with or without
first passing the HMAC handshake. The legitimate receiver is a real TransferEngine in this process.
Headers are written with the standard json module, so they can carry what orjson never writes: ints
past 64 bits, NaN and Infinity literals, lone surrogates. Every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

from fuzz_strategies import HOSTILE_SCALARS
from hypothesis import strategies as st

from pd_serve.transfer import RoomState, TransferEngine
from pd_serve.transfer.auth import new_nonce, proof
from pd_serve.transfer.handshake import host_id
from pd_serve.transfer.messages import (
    _KINDS,
    FRAME_PREFIX,
    PROTOCOL_VERSION,
    Hello,
    HelloProof,
    HelloReply,
    Message,
    MessageError,
    decode,
)

PEER_PATH = Path(__file__).parents[1] / "integration" / "transfer_peer.py"


def _load(name: str, path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


peer_module = _load("transfer_peer_for_fuzz", PEER_PATH)
helpers = _load("transfer_helpers_for_fuzz", PEER_PATH.with_name("transfer_helpers.py"))

TOKEN = "fuzz-cluster-token-5d1c0b7e9a"
DTYPE, SEED = "float32", 7
TARGET_TIMEOUT_S = 2.0  # the target's connect_timeout and room timeouts
NOFILE = 256  # the tcp targets' file descriptor limit: a connection flood reaches it cheaply
READ_TIMEOUT_S = 15.0  # longest wait for the target to answer or close (a loaded 2-core machine)
LEGIT_ROOM_BASE = 10**15  # legitimate rooms; fuzzed room ids are small or edge values
NUM_PAGES = peer_module.NUM_PAGES
FINGERPRINT = peer_module.fingerprint(DTYPE)


# ---- the target process ---------------------------------------------------------------------------
class Target:
    """transfer_peer.py as a prefill-side target; kill() always ends it, stderr is kept for reports."""

    def __init__(self, backend: str, token: str | None, nofile: int | None = None) -> None:
        self.backend, self.token = backend, token
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        args = [
            sys.executable,
            str(PEER_PATH),
            backend,
            DTYPE,
            str(SEED),
            token or "-",
            str(TARGET_TIMEOUT_S),
        ]
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in kill()

        def limit() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            env=env,
            preexec_fn=limit,
        )
        self._lines = helpers.ChildLines(self.proc)
        self._endpoint: str | None = None
        self._rooms = LEGIT_ROOM_BASE
        self.receiver: TransferEngine | None = None  # the legitimate receiver, in this process
        self.baseline: dict[str, Any] = {}  # stats() once the first legitimate room is done

    @property
    def plane(self) -> str:
        """The data plane raw peers speak with this target (an `auto` target takes tcp from them)."""
        return "tcp" if self.backend == "auto" else self.backend

    def _read(self, timeout: float) -> str:
        line: str | None = self._lines.next(timeout)
        if line is None:
            raise AssertionError(f"target said nothing within {timeout} s: {self.report()}")
        return line

    @property
    def endpoint(self) -> str:
        if self._endpoint is None:
            self._endpoint = self._read(120.0)
        return self._endpoint

    @property
    def port(self) -> int:
        return int(self.endpoint.rsplit(":", 1)[1])

    def report(self) -> str:
        self.stderr.seek(0)
        tail = self.stderr.read()[-3000:].decode(errors="replace")
        return f"{self.backend} target (exit code {self.proc.poll()}), stderr tail:\n{tail}"

    def check_alive(self) -> None:
        assert self.proc.poll() is None, f"the target process died: {self.report()}"

    def check_clean(self) -> None:
        """Alive, and no traceback in its log: an unexpected exception is a bug even if survived."""
        self.check_alive()
        self.stderr.seek(0)
        text = self.stderr.read().decode(errors="replace")
        for marker in ("Traceback", "exception was never retrieved"):
            at = text.find(marker)
            assert at < 0, f"the {self.backend} target logged an error:\n{text[max(0, at - 500) : at + 2500]}"

    def cmd(self, **command: Any) -> Any:
        _ = self.endpoint  # the first line it prints
        self.check_alive()
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return json.loads(self._read(READ_TIMEOUT_S))

    def stats(self) -> dict[str, Any]:
        return self.cmd(op="stats")  # type: ignore[no-any-return]

    def new_room(self) -> int:
        self._rooms += 1
        return self._rooms

    def kill(self) -> None:
        if self.receiver is not None:
            self.receiver.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.stderr.close()


def legit_room(target: Target, pages: int = 3) -> None:
    """A real receiver engine pulls one room from the target; every byte must match the source."""
    assert target.receiver is not None
    room = target.new_room()
    src = [NUM_PAGES - 1 - i * 5 for i in range(pages)]  # not contiguous: exercises staging too
    dst = [2 + i for i in range(pages)]
    target.cmd(op="expect", room=room, src=src, action="send")
    rx = target.receiver.receiver(room, target.endpoint, dst, pages * peer_module.PAGE_SIZE, "h")
    deadline = time.monotonic() + READ_TIMEOUT_S
    while rx.poll() not in (RoomState.SUCCESS, RoomState.FAILED) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert rx.poll() is RoomState.SUCCESS, f"legit room: {rx.poll()} {rx.failure_reason}; {target.report()}"
    source = peer_module.make_pools(DTYPE, SEED)
    for layer, (k, v) in enumerate(target.receiver.pools.pools):
        assert k[dst].equal(source[layer][0][src]) and v[dst].equal(source[layer][1][src]), layer


def wait_settled(target: Target, connections: int, timeout: float = READ_TIMEOUT_S) -> dict[str, Any]:
    """Until the target holds no room, no early request and at most `connections` connections."""
    deadline = time.monotonic() + timeout
    while True:
        facts = target.stats()
        s = facts["stats"]
        idle = s["live_senders"] == s["live_receivers"] == s["pending_room_requests"] == 0
        if idle and s.get("connections", 0) <= connections:
            return facts
        if time.monotonic() > deadline:
            raise AssertionError(f"target not idle within {timeout} s: {facts}")
        time.sleep(0.05)


# ---- raw frames and a raw peer --------------------------------------------------------------------
def header_bytes(value: Any) -> bytes:
    """JSON as the standard library writes it: big ints, NaN, Infinity and lone surrogates pass."""
    return json.dumps(value, allow_nan=True).encode()


def frame(
    header: bytes, payload: bytes = b"", header_len: int | None = None, payload_len: int | None = None
) -> bytes:
    """One frame; header_len/payload_len may lie about what follows."""
    hl = len(header) if header_len is None else header_len
    pl = len(payload) if payload_len is None else payload_len
    return FRAME_PREFIX.pack(hl, pl) + header + payload


def message_frame(message: Message, payload: bytes = b"") -> bytes:
    body = {"t": message.kind, **{f.name: getattr(message, f.name) for f in fields(message)}}  # type: ignore[arg-type]
    return frame(header_bytes(body), payload)


def ucx_address_field() -> str:
    """A syntactically valid worker address for hellos that never reach UCX."""
    return "0000abcd:" + "00" * 32


def hello_for(target: Target) -> Hello:
    """The Hello a legitimate receiver of this target would send."""
    ucx = ucx_address_field() if target.plane == "ucx" else None
    return Hello(
        PROTOCOL_VERSION, [target.plane], target.token is not None, new_nonce(), host_id(), os.getpid(), ucx
    )


class RawPeer:
    """A hostile peer on a plain blocking socket with a deadline on every read."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.sock = socket.create_connection(("127.0.0.1", target.port), timeout=READ_TIMEOUT_S)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def hello(self) -> Hello:
        return hello_for(self.target)

    def handshake(self) -> HelloReply:
        """Pass the handshake as a legitimate receiver would (with the token when the target has one):
        the target's reply offers our one plane, and we choose it."""
        hello = self.hello()
        self.send(message_frame(hello))
        reply = self.read_message()
        assert isinstance(reply, HelloReply) and reply.ok and reply.backends == [self.target.plane], reply
        mine = None
        if self.target.token is not None:
            assert reply.nonce is not None
            offer, plane = reply.backends, self.target.plane
            mine = proof(self.target.token, "receiver", hello, reply.nonce, reply.host_id, offer, plane)
        self.send(message_frame(HelloProof(self.target.plane, mine)))
        return reply

    def send(self, data: bytes) -> bool:
        """False when the target already closed the connection."""
        try:
            self.sock.sendall(data)
        except OSError:
            return False
        return True

    def read_message(self) -> Message:
        header_len, _ = FRAME_PREFIX.unpack(self._exact(FRAME_PREFIX.size))
        return decode(self._exact(header_len))

    def _exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        return buf

    def finish(self) -> list[Message]:
        """Half-close, then read until the target closes; the target must close within the deadline."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
        return self.drain()

    def drain(self, timeout: float = READ_TIMEOUT_S) -> list[Message]:
        self.sock.settimeout(timeout)
        data = b""
        deadline = time.monotonic() + timeout
        while True:
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                break
            except TimeoutError:
                raise AssertionError(f"the target kept the connection open past {timeout} s") from None
            if not chunk:
                break
            data += chunk
            assert time.monotonic() < deadline, "the target kept sending past the deadline"
        return parse_frames(data)


def parse_frames(data: bytes) -> list[Message]:
    out, pos = [], 0
    while pos + FRAME_PREFIX.size <= len(data):
        header_len, payload_len = FRAME_PREFIX.unpack_from(data, pos)
        end = pos + FRAME_PREFIX.size + header_len
        if end > len(data):
            break
        with contextlib.suppress(MessageError):
            out.append(decode(data[pos + FRAME_PREFIX.size : end]))
        pos = end + payload_len
    return out


# ---- strategies -----------------------------------------------------------------------------------
U64, I64 = 2**64, 2**63
INT_EDGES = [0, 1, -1, 2, 3, 4, 95, 96, 2**31, 2**32, 2**53 + 1, I64 - 1, I64, U64 - 1, U64, 2**100, -I64]  # fmt: skip
edge_int = st.one_of(st.sampled_from(INT_EDGES), st.integers(-(2**70), 2**70), st.integers(0, 8))
small_int = st.integers(-2, 100)
hostile_scalar = st.one_of(
    st.sampled_from(HOSTILE_SCALARS),
    edge_int,
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=10),
)
hostile_value = st.recursive(
    hostile_scalar,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
huge_list = st.builds(
    lambda n, v: [v] * n, st.sampled_from([1000, 20_000, 200_000]), st.sampled_from([0, 1, 95, U64 - 1])
)
int_list = st.lists(st.one_of(small_int, edge_int), max_size=6)
pair = st.lists(st.one_of(small_int, edge_int), min_size=2, max_size=2)

# plausible values per field name: right types, arbitrary numbers, so that checks past the types run
PLAUSIBLE: dict[str, st.SearchStrategy[Any]] = {
    "room": st.one_of(st.integers(0, 5), edge_int),
    "version": st.sampled_from([PROTOCOL_VERSION, 1, 3, 2.0]),
    "backends": st.one_of(
        st.lists(st.sampled_from(["tcp", "cma", "ucx", "auto", "", "TCP"]), max_size=4),
        st.just(["tcp"] * 1000),
    ),
    "backend": st.one_of(st.none(), st.sampled_from(["tcp", "cma", "ucx", "auto", "", "TCP"])),
    "auth": st.booleans(),
    "nonce": st.one_of(st.just(new_nonce()), st.text(max_size=80), st.just("0" * 256), st.just("0" * 257)),
    "host_id": st.one_of(st.just(host_id()), st.text(max_size=20)),
    "pid": st.one_of(st.just(os.getpid()), st.just(1), edge_int),
    "ucx_address": st.one_of(
        st.none(),
        st.just(ucx_address_field()),
        st.sampled_from(["", ":", "zz:00", "00000000:", "-1:00", "1_0:00", "f" * 40 + ":00", "0000abcd:0"]),
        st.text(max_size=20),
    ),
    "ok": st.booleans(),
    "reason": st.one_of(st.none(), st.text(max_size=20), st.just("r" * 100_000)),
    "proof": st.one_of(st.none(), st.text(max_size=70), st.just("0" * 64)),
    "probe": st.one_of(st.none(), st.lists(edge_int, max_size=4)),
    "fingerprint": st.one_of(
        st.just(FINGERPRINT),
        st.dictionaries(st.sampled_from(sorted(FINGERPRINT)), hostile_scalar, max_size=7).map(
            lambda d: {**FINGERPRINT, **d}
        ),
    ),
    "dst_page_ids": st.one_of(int_list, huge_list),
    "expected_tokens": st.one_of(small_int, edge_int),
    "prompt_hash": st.one_of(st.just("h"), st.text(max_size=8)),
    "seq": small_int,
    "layers": st.one_of(pair, st.lists(small_int, max_size=3), st.just([0, 2**40])),
    "runs": st.one_of(st.lists(pair, max_size=4), st.just([[0, 1]] * 5000), st.just([[0, 2**40]])),
    "nbytes": st.one_of(st.sampled_from([0, 1, 1536, 3072]), edge_int),
    "staged": st.booleans(),
    "src_base": st.one_of(st.none(), int_list),
    "src_starts": st.one_of(st.none(), int_list),
    "tag": st.one_of(st.none(), edge_int),
    "parts": st.one_of(st.integers(-1, 8), edge_int, st.just(10**9)),
    "first_token": edge_int,
    "first_token_logprobs": hostile_value,
    "data_messages": small_int,
}
PAGE_BYTES = peer_module.PAGE_SIZE * peer_module.HEADS * peer_module.HEAD_DIM * 4  # float32


@st.composite
def near_data(draw: Any, backend: str, room: int, dst: list[int]) -> bytes:
    """A Data frame for `room` that a sender of this backend could almost have written: runs over
    the room's pages (or beyond), with sizes, tags and addresses right or slightly off."""
    layers = draw(st.sampled_from([[0, 3], [0, 1], [1, 3], [2, 3], [0, 4], [3, 3], [-1, 1]]))
    runs = draw(
        st.sampled_from(
            [
                [[dst[0], len(dst)]],
                [[dst[0], 1]],
                [[dst[-1], 1], [dst[0], 1]],
                [[dst[0], 1]] * 2,
                [[NUM_PAGES - 1, 1]],
                [[NUM_PAGES, 1]],
                [[0, 0]],
            ]
        )
    )
    pages = sum(c for _, c in runs)
    width = max(0, layers[1] - layers[0])
    nbytes = width * 2 * pages * PAGE_BYTES + draw(st.sampled_from([0, 0, 0, 1, -PAGE_BYTES]))
    body: dict[str, Any] = {
        "t": "data",
        "room": room,
        "seq": 0,
        "layers": layers,
        "runs": runs,
        "nbytes": nbytes,
        "staged": draw(st.booleans()),
    }
    payload = b""
    if backend == "tcp":
        payload = b"\x11" * max(0, nbytes + draw(st.sampled_from([0, 0, 0, -1, 7])))
    elif backend == "cma":
        buf_address = draw(st.sampled_from([0, 4096, 2**47, U64 - 1, -1]))
        body["src_base"] = [buf_address] * (2 * width + draw(st.sampled_from([0, 0, 1])))
        body["src_starts"] = [s for s, _ in runs] + draw(st.sampled_from([[], [], [0]]))
    return frame(header_bytes(body), payload)


def _field_value(name: str) -> st.SearchStrategy[Any]:
    return st.one_of(PLAUSIBLE.get(name, hostile_value), hostile_value, huge_list)


@st.composite
def message_body(draw: Any, kinds: list[str], room: int | None = None) -> dict[str, Any]:
    """A control header: a message kind with each field plausible or hostile, some missing, some
    extra; `room`: a live room id that the room field takes half the time."""
    kind = draw(st.sampled_from([*kinds, "bogus", ""]))
    cls = _KINDS.get(kind)
    names = [f.name for f in fields(cls)] if cls is not None else ["room"]
    body: dict[str, Any] = {"t": kind}
    for name in names:
        if name == "room" and room is not None and draw(st.booleans()):
            body[name] = room
        elif draw(st.integers(0, 15)) > 0:  # a field now and then missing
            body[name] = draw(_field_value(name))
    if draw(st.integers(0, 7)) == 0:
        body[draw(st.sampled_from(["extra", "t2", "token", "kind"]))] = draw(hostile_value)
    if draw(st.integers(0, 15)) == 0:
        body["t"] = draw(hostile_scalar)  # the kind itself of a wrong type
    return body


ALL_KINDS = sorted(_KINDS)
ROOM_KINDS = ["room_request", "room_accept", "room_abort", "data", "finish", "finish_ack"]


@st.composite
def hostile_frame(draw: Any, kinds: list[str], room: int | None = None) -> bytes:
    """One frame: a fuzzed header, sometimes a payload, sometimes lying lengths or garbage."""
    body = draw(message_body(kinds, room))
    header = header_bytes(body)
    payload_n = draw(st.sampled_from([0, 0, 0, 1, 1536, 3072]))
    payload = b"\x5a" * payload_n
    shape = draw(st.integers(0, 9))
    if shape == 0:  # header_len lies (shorter or longer than the header)
        return frame(header, payload, header_len=draw(st.integers(0, len(header) + 64)))
    if shape == 1:  # payload_len lies
        return frame(header, payload, payload_len=draw(st.sampled_from([0, 1, 2**20, 2**63, U64 - 1])))
    if shape == 2:  # garbage instead of JSON
        return frame(draw(st.binary(min_size=0, max_size=40)), payload)
    return frame(header, payload)


# ---- a hostile sender for the target's receive path -----------------------------------------------
class FakeSender:
    """A prefill side in this process, reached by the target acting as a receiver (its `receive`
    op): it passes the handshake (with the token, and for cma a real probe buffer here), takes the
    room request, accepts it, then sends whatever the test gives it."""

    def __init__(self, target: Target) -> None:
        import zlib

        import numpy as np

        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(READ_TIMEOUT_S)
        self.endpoint = f"{target.plane}://127.0.0.1:{self.listener.getsockname()[1]}"
        self._probe = np.frombuffer(os.urandom(64), dtype=np.uint8).copy()
        self._probe_field = [self._probe.ctypes.data, self._probe.nbytes, zlib.crc32(self._probe.tobytes())]

    def open_room(self, room: int, dst: list[int]) -> socket.socket:
        """Have the target request `room` from us; returns the accepted, handshaken connection."""
        self.target.cmd(
            op="receive", room=room, endpoint=self.endpoint, dst=dst, tokens=len(dst) * peer_module.PAGE_SIZE
        )
        conn, _ = self.listener.accept()
        conn.settimeout(READ_TIMEOUT_S)
        peer = RawPeer.__new__(RawPeer)
        peer.target, peer.sock = self.target, conn
        hello = peer.read_message()
        assert isinstance(hello, Hello), hello
        nonce = new_nonce()
        token = self.target.token
        plane = [self.target.plane]
        mine = proof(token, "sender", hello, nonce, host_id(), plane, "") if token is not None else None
        probe = self._probe_field if self.target.plane == "cma" else None
        ucx = ucx_address_field() if self.target.plane == "ucx" else None
        peer.send(
            message_frame(
                HelloReply(True, None, host_id(), os.getpid(), nonce if token else None, mine, ucx, probe, plane)
            )
        )
        choice = peer.read_message()
        assert isinstance(choice, HelloProof) and choice.backend == self.target.plane, choice
        request = peer.read_message()
        assert request.kind == "room_request" and request.room == room, request  # type: ignore[union-attr]
        return conn

    def close(self) -> None:
        self.listener.close()


def wait_room_terminal(target: Target, room: int) -> str:
    deadline = time.monotonic() + READ_TIMEOUT_S
    while True:
        state, reason = target.cmd(op="status", rooms=[room])[str(room)]
        if state in ("SUCCESS", "FAILED"):
            return str(state)
        if time.monotonic() > deadline:
            raise AssertionError(f"target's receiver room {room} still {state} after {READ_TIMEOUT_S} s")
        time.sleep(0.02)
