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
from pd_serve.transfer.messages import Data
from pd_serve.transfer.plane import DataPlane

_IOV_MAX = 1024
_MAX_SEGMENT = 1 << 30  # process_vm_readv returns at most ~2 GiB per call


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.process_vm_readv.restype = ctypes.c_ssize_t
_libc.process_vm_readv.argtypes = [
    ctypes.c_int, ctypes.POINTER(_Iovec), ctypes.c_ulong, ctypes.POINTER(_Iovec), ctypes.c_ulong, ctypes.c_ulong,
]


def pair_segments(local: list[tuple[int, int]], remote: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """Split two byte streams of (address, length) at the union of their boundaries."""
    out: list[tuple[int, int, int]] = []
    li = ri = lo = ro = 0
    while li < len(local) and ri < len(remote):
        n = min(local[li][1] - lo, remote[ri][1] - ro, _MAX_SEGMENT)
        out.append((local[li][0] + lo, remote[ri][0] + ro, n))
        lo, ro = lo + n, ro + n
        if lo == local[li][1]:
            li, lo = li + 1, 0
        if ro == remote[ri][1]:
            ri, ro = ri + 1, 0
    if li < len(local) or ri < len(remote):
        raise ValueError("local and remote byte counts differ")
    return out


def read_remote(pid: int, segments: list[tuple[int, int, int]]) -> None:
    """Copy every (local, remote, length) segment from process `pid`; raises OSError on failure."""
    for start in range(0, len(segments), _IOV_MAX):
        batch = segments[start : start + _IOV_MAX]
        local = (_Iovec * len(batch))(*[_Iovec(lo, n) for lo, _, n in batch])
        remote = (_Iovec * len(batch))(*[_Iovec(ro, n) for _, ro, n in batch])
        want = sum(n for _, _, n in batch)
        got = _libc.process_vm_readv(pid, local, len(batch), remote, len(batch), 0)
        if got != want:
            err = ctypes.get_errno()
            raise OSError(err, f"process_vm_readv from pid {pid}: {os.strerror(err) if got < 0 else f'short read {got}/{want}'}")


def _regions(views: list[torch.Tensor]) -> list[tuple[int, int]]:
    return [(v.data_ptr(), v.numel() * v.element_size()) for v in views]


class CmaPlane(DataPlane):
    name = "cma"
    gathers = False  # the iovecs do the gathering
    stages_receive = False

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self._probe = np.frombuffer(os.urandom(64), dtype=np.uint8).copy()

    def hello_fields(self, conn: Connection | None) -> dict[str, Any]:
        if conn is not None and not conn.outbound:
            return {"probe": [self._probe.ctypes.data, self._probe.nbytes, zlib.crc32(self._probe.tobytes())]}
        return {}

    async def on_hello(self, conn: Connection, peer: Any) -> str | None:
        from pd_serve.transfer.node import host_id

        if peer.host_id != host_id():
            return f"cma needs both engines on one host; peer host {peer.host_id!r} is not {host_id()!r}"
        if not conn.outbound:
            return None
        address, length, crc = peer.probe
        buf = np.zeros(length, dtype=np.uint8)
        try:
            await asyncio.to_thread(read_remote, peer.pid, [(buf.ctypes.data, address, length)])
        except OSError as exc:
            return f"cma probe read failed ({exc}); check ptrace permissions or use --transfer-backend tcp"
        return None if zlib.crc32(buf.tobytes()) == crc else "cma probe read returned wrong bytes"

    async def send_data(self, conn: Connection, header: Data, views: list[torch.Tensor]) -> None:
        iov = [[addr, n] for addr, n in _regions(views)]
        await conn.send(Data(**{**header.__dict__, "src_iov": iov}))

    async def receive(
        self, conn: Connection, header: Data, payload_len: int, views: list[torch.Tensor], live: Callable[[], bool]
    ) -> bool:
        if header.src_iov is None or payload_len:
            raise ConnectionError("cma Data without source addresses")
        segments = pair_segments(_regions(views), [(a, n) for a, n in header.src_iov])
        step = 256
        for start in range(0, len(segments), step):
            if not live():
                return False
            await asyncio.to_thread(read_remote, conn.hello.pid, segments[start : start + step])
        return live()
