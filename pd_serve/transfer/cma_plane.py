"""The cma data plane: on one host, the receiver pulls KV straight out of the sender's pools.

Linux cross-memory attach (`process_vm_readv`) copies from another process's address space in one
copy, with no staging on either side: the Data header carries the sender's source addresses, and
the receiver reads them into its destination page runs. It needs the same host (checked by boot
id and a probe read at the handshake) and ptrace permission (same user; Yama ptrace_scope <= 1
or a parent/child relation). A dead sender makes the read fail with ESRCH, which fails the room;
nothing ever aborts the process. Source pages must stay put until the room ends (see package doc).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from pd_serve.transfer.connection import Connection
from pd_serve.transfer.handshake import host_id
from pd_serve.transfer.messages import Data, Hello, HelloReply
from pd_serve.transfer.plane import DataPlane

_IOV_MAX = 1024
PROBE_MAX_BYTES = 4096  # the probe buffer a peer may ask us to read back at the handshake
READ_THREADS = 2  # parallel process_vm_readv calls: measured 1.2-1.5x one call on 2 cores


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.process_vm_readv.restype = ctypes.c_ssize_t
_libc.process_vm_readv.argtypes = [
    ctypes.c_int,
    ctypes.POINTER(_Iovec),
    ctypes.c_ulong,
    ctypes.POINTER(_Iovec),
    ctypes.c_ulong,
    ctypes.c_ulong,
]


_IOVEC = np.dtype([("base", np.uint64), ("len", np.uint64)])


def iovecs(addresses: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    out = np.empty(len(addresses), dtype=_IOVEC)
    out["base"], out["len"] = addresses, lengths
    return out


def split_by_bytes(n: int, lengths: np.ndarray, parts: int) -> list[tuple[int, int]]:
    """Cut n iovecs into <= parts contiguous groups of about equal bytes (never inside an iovec)."""
    cum = np.cumsum(lengths)
    targets = [cum[-1] * (i + 1) / parts for i in range(parts - 1)] if n else []
    cuts = sorted({0, n, *(int(np.searchsorted(cum, t)) + 1 for t in targets)})
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if a < b]


def read_remote(
    pid: int, local: np.ndarray, remote: np.ndarray, live: Callable[[], bool] | None = None
) -> bool:
    """Copy `remote` iovecs of process `pid` into `local` iovecs (same lengths, in order), up to
    IOV_MAX at a time, stopping early once `live()` is False; raises OSError on failure."""
    for start in range(0, len(local), _IOV_MAX):
        if live is not None and not live():
            return False
        lo, ro = local[start : start + _IOV_MAX], remote[start : start + _IOV_MAX]
        want = int(lo["len"].sum())
        iov = ctypes.POINTER(_Iovec)
        got = _libc.process_vm_readv(pid, lo.ctypes.data_as(iov), len(lo), ro.ctypes.data_as(iov), len(ro), 0)
        if got != want:
            err = ctypes.get_errno()
            detail = os.strerror(err) if got < 0 else f"short read {got}/{want}"
            raise OSError(err, f"process_vm_readv from pid {pid}: {detail}")
    return True


class CmaPlane(DataPlane):
    name = "cma"
    gathers = False  # the iovecs do the gathering
    stages_receive = False
    needs_views = False

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self._probe = np.frombuffer(os.urandom(64), dtype=np.uint8).copy()

    def hello_fields(self, conn: Connection, peer: Hello | None) -> dict[str, Any]:
        if peer is not None:  # our reply: a buffer for the receiver to read back
            return {"probe": [self._probe.ctypes.data, self._probe.nbytes, zlib.crc32(self._probe.tobytes())]}
        return {}

    def refusal(self, peer: Hello | HelloReply) -> str | None:
        here = host_id()
        if peer.host_id != here:
            return f"cma needs both engines on one host; peer host {str(peer.host_id)[:80]!r} is not {here!r}"
        return None

    async def on_hello(self, conn: Connection, peer: Hello | HelloReply) -> str | None:
        if not conn.outbound:
            return None
        probe = getattr(peer, "probe", None)
        if probe is None or len(probe) != 3 or probe[0] < 0 or not 0 < probe[1] <= PROBE_MAX_BYTES:
            return f"cma peer sent a malformed probe {str(probe)[:80]}"
        if not 0 < peer.pid < 2**31:
            return f"cma peer sent a malformed pid {peer.pid}"
        address, length, crc = probe
        buf = np.zeros(length, dtype=np.uint8)
        local = iovecs(np.array([buf.ctypes.data], np.uint64), np.array([length], np.uint64))
        remote = iovecs(np.array([address], np.uint64), np.array([length], np.uint64))
        try:
            await asyncio.to_thread(read_remote, peer.pid, local, remote)
        except OSError as exc:
            return f"cma probe read failed ({exc}); check ptrace permissions or use --transfer-backend tcp"
        return None if zlib.crc32(buf.tobytes()) == crc else "cma probe read returned wrong bytes"

    def data_refusal(self, header: Data, payload_len: int) -> str | None:
        base, starts = header.src_base, header.src_starts
        if base is None or starts is None or payload_len:
            return "cma Data without source addresses, or with a payload"
        if len(starts) != len(header.runs) or len(base) != 2 * (header.layers[1] - header.layers[0]):
            return "cma Data source addresses do not match its runs"
        if any(v < 0 for v in (*base, *starts)):
            return "cma Data with a negative source address"
        return None

    async def send_data(self, conn: Connection, header: Data, views: list[torch.Tensor]) -> None:
        await conn.send(header)  # carries src_base / src_starts; the receiver pulls

    async def receive(
        self,
        conn: Connection,
        header: Data,
        payload_len: int,
        views: list[torch.Tensor],
        live: Callable[[], bool],
    ) -> bool:
        assert header.src_base is not None and header.src_starts is not None  # data_refusal
        first, end = header.layers
        counts = [count for _, count in header.runs]
        local = iovecs(
            *self.pools.regions(self.pools.bases(range(first, end)), [s for s, _ in header.runs], counts)
        )
        remote = iovecs(*self.pools.regions(header.src_base, header.src_starts, counts))
        parts = split_by_bytes(len(local), local["len"], READ_THREADS)
        reads = [
            asyncio.to_thread(read_remote, conn.hello.pid, local[a:b], remote[a:b], live) for a, b in parts
        ]
        done = await asyncio.gather(*reads)
        return all(done) and live()
