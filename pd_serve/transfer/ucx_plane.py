"""The ucx data plane: KV bytes as UCX tag messages, control frames on the TCP connection.

Each plane owns its UCX context and worker (ucxx's core API, `ucxx._lib.libucxx`), progressed on
the transfer loop by `ucx_progress.WorkerProgress`: blocked on the worker's event descriptor, so an
idle plane uses no CPU. Endpoints are made from worker addresses exchanged in the Hello (not
through a UCX listener), and each Data header names a 64-bit tag base (connection nonce << 32 |
counter): part i of a message is one tag message into one destination run view (or one staging
buffer). Host memory here; CUDA pools work the same way (ucxx takes `__cuda_array_interface__`)
over cuda_ipc or RDMA.

UCX settings, measured on the shared 2-core dev VM (load ~6 from other work, so numbers swing
2x), a 256 MiB room between two processes, memcpy ~6-7 GB/s (bench/bench_transfer.py):
- Peer error handling is on for every endpoint, and with it UCX refuses the single-copy cma path
  and the posix path without error support: rendezvous data goes over `tcp/lo` (`UCX_PROTO_INFO=y`
  shows "rendezvous fragmented copy-in copy-out | tcp/lo"). On one host the `cma` backend (and
  `auto`, which picks it there) is the fast path.
- `ucx_error_handling=False` lets UCX use "rendezvous zero-copy read from remote | cma/memory"
  (one process_vm_readv copy). But a peer killed mid-transfer then aborts *this* process inside
  UCX (measured: SIGABRT after "process_vm_readv ... No such process"), so it is opt-in.
- Progress on the loop (not a progress thread): a thread competes for the two cores and the GIL.
- `RNDV_FRAG_SIZE=host:8M` (from 512K): fewer fragments on the tcp rendezvous, ~+30%.
- `TCP_TX_SEG_SIZE=64K`, `TCP_RX_SEG_SIZE=256K` (from 8K and 64K): large tag messages go as
  "multi-frag eager copy-in copy-out | tcp/lo", and each fragment costs the loop a wake-up and a
  progress call; 8x fewer fragments moved 1.3-1.4 GB/s to 2.6-3.2 (256 MiB room; larger segments
  gained nothing more).
- `CMA_SEG_SIZE=8M` (from 512K) and `RNDV_SCHEME=get_zcopy`: the receiver pulls straight into
  its pages in large reads. Listener (sockaddr) endpoints were slower than worker-address ones.
We set `TLS=tcp,cma,sm,self` (UCX drops what error handling forbids) and
`WARN_UNUSED_ENV_VARS=n`; UCX_* environment variables override them. On GPU or RDMA nodes set
`UCX_TLS` to add `cuda_copy,cuda_ipc` or `rc` (or `all`).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import string
from collections.abc import Callable, Mapping
from typing import Any

import torch

from pd_serve.transfer.config import TransferConfig
from pd_serve.transfer.connection import Connection
from pd_serve.transfer.messages import Data, Hello, HelloReply
from pd_serve.transfer.plane import DataPlane, byte_view
from pd_serve.transfer.ucx_progress import WorkerProgress

UCX_OPTIONS = {
    "TLS": "tcp,cma,sm,self",
    "RNDV_SCHEME": "get_zcopy",
    "CMA_SEG_SIZE": "8M",
    "RNDV_FRAG_SIZE": "host:8M",
    "TCP_TX_SEG_SIZE": "64K",
    "TCP_RX_SEG_SIZE": "256K",
    "WARN_UNUSED_ENV_VARS": "n",
}
# What can be checked of a worker address before UCX unpacks it: its first byte's low 4 bits are the
# format version (0 and 1 exist); UCX asserts on any other value and aborts the whole process
# (measured: a Hello address starting 0x5a killed the sender at its first send). The rest of the
# format is UCX's own; an authenticated peer is trusted to send what its UCX packed.
UCX_ADDRESS_VERSIONS = (0, 1)
MIN_ADDRESS_BYTES = 9  # the header byte and the 64-bit worker uuid
CLOSE_PERIOD_NS = 10**9  # longest an endpoint close waits for UCX


def _is_hex(text: str) -> bool:
    return all(c in string.hexdigits for c in text)


def ucx_options(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """UCX_OPTIONS without the ones the environment sets (UCX reads UCX_* itself)."""
    return {k: v for k, v in UCX_OPTIONS.items() if f"UCX_{k}" not in environ}


def address_refusal(field: str | None) -> str | None:
    """Why a Hello's `ucx_address` ("<8 hex digits of nonce>:<worker address hex>") is unusable."""
    nonce_hex, _, address = (field or "").rpartition(":")
    # the nonce becomes the high 32 bits of every tag on this connection: exactly 8 hex digits
    if not (len(nonce_hex) == 8 and _is_hex(nonce_hex) and len(address) % 2 == 0 and _is_hex(address)):
        return "ucx peer sent a malformed worker address"
    if not address:
        return "ucx peer sent no worker address"
    if len(address) < 2 * MIN_ADDRESS_BYTES or int(address[:2], 16) & 0x0F not in UCX_ADDRESS_VERSIONS:
        return "ucx peer sent a worker address of an unknown format"
    return None


class _Peer:
    def __init__(self, nonce: int, address: str = "") -> None:
        self.nonce = nonce
        self.address = address  # the peer's worker address (hex), for an endpoint made later
        self.endpoint: Any = None
        self.counter = itertools.count()

    def next_tag(self, parts: int) -> int:
        start = next(self.counter)
        for _ in range(parts - 1):
            next(self.counter)
        return (self.nonce << 32) | (start & 0xFFFFFFFF)


class UcxPlane(DataPlane):
    name = "ucx"
    host_only = False

    def __init__(self, config: TransferConfig) -> None:
        super().__init__(config)
        self._api: Any = None
        self._array: Any = None  # ucxx's buffer wrapper (host buffers and __cuda_array_interface__)
        self._worker: Any = None
        self._context: Any = None
        self.progress: WorkerProgress | None = None
        self._peers: set[_Peer] = set()  # those with an endpoint, closed at close()

    async def start(self) -> None:
        from ucxx._lib import libucxx
        from ucxx._lib.arr import Array

        self._api, self._array = libucxx, Array
        self._context = libucxx.UCXContext(ucx_options())
        self._worker = libucxx.UCXWorker(self._context)
        self.progress = WorkerProgress(self._worker, asyncio.get_running_loop())
        self._address = self._worker.address.tobytes().hex()

    def hello_fields(self, conn: Connection, peer: Hello | None) -> dict[str, Any]:
        if peer is None:  # our Hello: a fresh nonce for the tags of this connection
            conn.plane_state = _Peer(int.from_bytes(os.urandom(4), "little"))
            return {"ucx_address": f"{conn.plane_state.nonce:08x}:{self._address}"}
        nonce_hex = str(peer.ucx_address).rpartition(":")[0]  # checked by refusal()
        return {"ucx_address": f"{nonce_hex}:{self._address}"}

    def refusal(self, peer: Hello | HelloReply) -> str | None:
        return address_refusal(peer.ucx_address)

    async def on_hello(self, conn: Connection, peer: Hello | HelloReply) -> str | None:
        nonce_hex, _, address = str(peer.ucx_address).rpartition(":")
        if not conn.outbound:
            # The sender side: the receiver proved the token (or the cluster has none) and chose ucx.
            # The endpoint is made at the first send; UCX aborts the process on a malformed address,
            # so only such a peer's address is ever unpacked.
            conn.plane_state = _Peer(int(nonce_hex, 16), address)
            return None
        conn.plane_state.address = address
        return self._endpoint(conn)

    def _endpoint(self, conn: Connection) -> str | None:
        """Make the connection's endpoint once; returns a failure reason or None."""
        peer: _Peer = conn.plane_state
        if peer.endpoint is not None:
            return None
        if conn.closed:
            return f"connection to {conn.peer} closed"
        try:
            address = self._api.UCXAddress.create_from_buffer(bytes.fromhex(peer.address))
            peer.endpoint = self._api.UCXEndpoint.create_from_worker_address(
                self._worker, address, self.config.ucx_error_handling
            )
        except Exception as exc:  # ucxx raises its own exception types
            return f"ucx endpoint to {conn.peer} failed: {exc}"
        self._peers.add(peer)
        self._progressor().soon()
        return None

    def _progressor(self) -> WorkerProgress:
        if self.progress is None:
            raise ConnectionError("the ucx plane is not started")
        return self.progress

    async def _run(self, requests: list[tuple[Any, Any]]) -> None:
        await asyncio.gather(*[self._progressor().wait(req, buf) for req, buf in requests])

    async def send_data(self, conn: Connection, header: Data, views: list[torch.Tensor]) -> None:
        peer: _Peer = conn.plane_state
        reason = self._endpoint(conn)
        if reason is not None:
            raise ConnectionError(reason)
        tag = peer.next_tag(len(views))
        await conn.send(Data(**{**header.__dict__, "tag": tag, "parts": len(views)}))
        if peer.endpoint is None:  # closed while the header was being written
            raise ConnectionError(f"ucx endpoint to {conn.peer} closed")
        wrap, tag_of = self._array, self._api.UCXXTag
        posted = []
        for i, view in enumerate(views):
            buf = wrap(byte_view(view))
            posted.append((peer.endpoint.tag_send(buf, tag_of(tag + i)), buf))
        await self._run(posted)

    async def receive(
        self,
        conn: Connection,
        header: Data,
        payload_len: int,
        views: list[torch.Tensor],
        live: Callable[[], bool],
    ) -> bool:
        if header.tag is None or header.parts != len(views):
            raise ConnectionError(f"ucx Data with {header.parts} parts for {len(views)} destination regions")
        targets = [byte_view(v) for v in views] if live() else [self._scratch(v) for v in views]
        await self._recv_all(conn, header.tag, targets)
        return live()

    def data_refusal(self, header: Data, payload_len: int) -> str | None:
        parts = 1 if header.staged else 2 * (header.layers[1] - header.layers[0]) * len(header.runs)
        if payload_len or header.parts != parts:
            return (
                f"ucx Data in {header.parts} parts with a {payload_len}-byte payload; its runs make {parts}"
            )
        if header.tag is None or not 0 <= header.tag <= 2**64 - parts:
            return f"ucx Data with tag {header.tag}"
        return None

    async def discard(self, conn: Connection, header: Data, payload_len: int, part_bytes: list[int]) -> None:
        """Receive the parts one after another into one scratch buffer (tag matching keeps the
        others waiting), so a discarded message costs its largest part in memory, not its sum."""
        peer = conn.plane_state
        if header.tag is None or not isinstance(peer, _Peer) or peer.endpoint is None:
            return
        scratch = torch.empty(max(part_bytes), dtype=torch.uint8).numpy()
        for i, n in enumerate(part_bytes):
            await self._recv_all(conn, header.tag + i, [scratch[:n]])

    def _scratch(self, view: torch.Tensor) -> Any:
        """Somewhere to receive a part meant for `view` whose room is gone (same device: host or GPU)."""
        return byte_view(
            torch.empty(view.numel() * view.element_size(), dtype=torch.uint8, device=view.device)
        )

    async def _recv_all(self, conn: Connection, tag: int, targets: list[Any]) -> None:
        peer: _Peer = conn.plane_state
        if peer.endpoint is None:
            raise ConnectionError(f"ucx endpoint to {conn.peer} closed")
        wrap, tag_of = self._array, self._api.UCXXTag
        posted = []
        for i, target in enumerate(targets):
            buf = wrap(target)
            posted.append((peer.endpoint.tag_recv(buf, tag_of(tag + i)), buf))
        try:
            await asyncio.wait_for(self._run(posted), self.config.transfer_timeout)
        except asyncio.TimeoutError:
            self.close_connection(conn)  # cancels the posted receives: nothing writes into the pages after
            raise ConnectionError(
                f"ucx receive from {conn.peer} made no progress within transfer_timeout"
            ) from None

    def close_connection(self, conn: Connection) -> None:
        peer = conn.plane_state
        if isinstance(peer, _Peer) and peer.endpoint is not None:
            endpoint, peer.endpoint = peer.endpoint, None
            self._peers.discard(peer)
            endpoint.close_blocking(period=CLOSE_PERIOD_NS, max_attempts=1)
            if self.progress is not None:
                self.progress.soon()

    async def close(self) -> None:
        for peer in list(self._peers):
            if peer.endpoint is not None:
                peer.endpoint.close_blocking(period=CLOSE_PERIOD_NS, max_attempts=1)
                peer.endpoint = None
        self._peers.clear()
        if self.progress is not None:
            self.progress.close()
        self._worker = self._context = None
