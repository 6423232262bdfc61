"""The ucx data plane: KV bytes as ucxx tag messages, control frames on the TCP connection.

Endpoints are made from worker addresses exchanged in the Hello (not through a UCX listener), and
each Data header names a 64-bit tag base (connection nonce << 32 | counter): part i of a message
is one tag message into one destination run view (or one staging buffer). Host memory here; CUDA
pools work the same way (ucxx takes `__cuda_array_interface__`) over cuda_ipc or RDMA.

UCX settings, measured on the shared 2-core dev VM (load ~6 from other work, so numbers swing
2x), a 256 MiB room between two processes, memcpy ~6-7 GB/s (bench/bench_transfer.py):
- ucxx enables peer error handling on every endpoint, and with it UCX refuses the single-copy
  cma path and the posix path without error support: rendezvous data goes over `tcp/lo`
  (`UCX_PROTO_INFO=y` shows "rendezvous fragmented copy-in copy-out | tcp/lo"), 0.2-0.9 GB/s.
- `ucx_error_handling=False` lets UCX use "rendezvous zero-copy read from remote | cma/memory"
  (one process_vm_readv copy): 2.2-3.5 GB/s. But a peer killed mid-transfer then aborts *this*
  process inside UCX (measured: SIGABRT after "process_vm_readv ... No such process"), so it is
  opt-in; the cma backend gives the same single copy with errors we handle.
- progress mode `blocking` (the worker's epoll fd on our event loop): 2.2-3.5 GB/s vs 0.9-1.7
  for `thread` with cma, and 0.2-0.9 vs 0.1-0.5 over tcp; a progress thread competes for the
  two cores. `polling`/`thread-polling` burn a core.
- `RNDV_FRAG_SIZE=host:8M` (from 512K): fewer fragments on the tcp rendezvous, ~+30%.
- `CMA_SEG_SIZE=8M` (from 512K) and `RNDV_SCHEME=get_zcopy`: the receiver pulls straight into
  its pages in large reads. Listener (sockaddr) endpoints were slower than worker-address ones.
We set `TLS=tcp,cma,sm,self` (UCX drops what error handling forbids) and
`WARN_UNUSED_ENV_VARS=n`; UCX_* / UCXPY_PROGRESS_MODE environment variables override them. On
GPU nodes add `cuda_copy,cuda_ipc` (or rc) to UCX_TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import string
from collections.abc import Callable
from typing import Any

import torch

from pd_serve.transfer.config import TransferConfig
from pd_serve.transfer.connection import Connection
from pd_serve.transfer.messages import Data
from pd_serve.transfer.plane import DataPlane, byte_view

UCX_OPTIONS = {
    "TLS": "tcp,cma,sm,self",
    "RNDV_SCHEME": "get_zcopy",
    "CMA_SEG_SIZE": "8M",
    "RNDV_FRAG_SIZE": "host:8M",
    "WARN_UNUSED_ENV_VARS": "n",
}
PROGRESS_MODE = "blocking"
# What can be checked of a worker address before UCX unpacks it: its first byte's low 4 bits are the
# format version (0 and 1 exist); UCX asserts on any other value and aborts the whole process
# (measured: a Hello address starting 0x5a killed the sender at its first send). The rest of the
# format is UCX's own; an authenticated peer is trusted to send what its UCX packed.
UCX_ADDRESS_VERSIONS = (0, 1)
MIN_ADDRESS_BYTES = 9  # the header byte and the 64-bit worker uuid


def _is_hex(text: str) -> bool:
    return all(c in string.hexdigits for c in text)


class _Peer:
    def __init__(self, nonce: int, address: str = "") -> None:
        self.nonce = nonce
        self.address = address  # the peer's worker address (hex), for an endpoint made later
        self.endpoint: Any = None
        self.connecting = asyncio.Lock()
        self.counter = itertools.count()

    def next_tag(self, parts: int) -> int:
        start = next(self.counter)
        for _ in range(parts - 1):
            next(self.counter)
        return (self.nonce << 32) | (start & 0xFFFFFFFF)


class UcxPlane(DataPlane):
    name = "ucx"

    def __init__(self, config: TransferConfig) -> None:
        super().__init__(config)
        self._ucxx: Any = None

    async def start(self) -> None:
        import ucxx

        mode = os.environ.get("UCXPY_PROGRESS_MODE", PROGRESS_MODE)
        # RuntimeError: already initialised by another engine in this process; share its context
        with contextlib.suppress(RuntimeError):
            ucxx.init(options=UCX_OPTIONS, env_takes_precedence=True, progress_mode=mode)
        self._ucxx = ucxx
        self._address = ucxx.get_worker_address().tobytes().hex()

    def hello_fields(self, conn: Connection | None) -> dict[str, Any]:
        if conn is None:
            return {"ucx_address": self._address}
        if conn.outbound and conn.plane_state is None:
            conn.plane_state = _Peer(int.from_bytes(os.urandom(4), "little"))
        return {"ucx_address": f"{conn.plane_state.nonce:08x}:{self._address}"}

    async def on_hello(self, conn: Connection, peer: Any) -> str | None:
        nonce_hex, _, address = (peer.ucx_address or "").rpartition(":")
        # the nonce becomes the high 32 bits of every tag on this connection: exactly 8 hex digits
        if not (len(nonce_hex) == 8 and _is_hex(nonce_hex) and len(address) % 2 == 0 and _is_hex(address)):
            return "ucx peer sent a malformed worker address"
        if not address:
            return "ucx peer sent no worker address"
        if len(address) < 2 * MIN_ADDRESS_BYTES or int(address[:2], 16) & 0x0F not in UCX_ADDRESS_VERSIONS:
            return "ucx peer sent a worker address of an unknown format"
        nonce = int(nonce_hex, 16)
        if not conn.outbound:
            # The sender side runs this before the receiver has proved the cluster token, so it only
            # notes the address: the endpoint is made at the first send, after the handshake. UCX
            # aborts the process on a malformed address, so only a peer that proved the token (or
            # any peer, on a cluster run without one) may have its address unpacked.
            conn.plane_state = _Peer(nonce, address)
            return None
        conn.plane_state.address = address
        return await self._endpoint(conn)

    async def _endpoint(self, conn: Connection) -> str | None:
        """Make the connection's endpoint once; returns a failure reason or None."""
        peer: _Peer = conn.plane_state
        async with peer.connecting:
            if peer.endpoint is not None:
                return None
            addr = self._ucxx.get_ucx_address_from_buffer(bytes.fromhex(peer.address))
            try:
                peer.endpoint = await asyncio.wait_for(
                    self._ucxx.create_endpoint_from_worker_address(
                        addr, endpoint_error_handling=self.config.ucx_error_handling
                    ),
                    self.config.connect_timeout,
                )
            except Exception as exc:  # ucxx raises its own exception types; TimeoutError too
                return f"ucx endpoint to {conn.peer} failed: {exc}"
            if conn.closed:  # closed while the endpoint was being made: close_connection has run
                self.close_connection(conn)
                return f"connection to {conn.peer} closed"
        return None

    async def send_data(self, conn: Connection, header: Data, views: list[torch.Tensor]) -> None:
        peer: _Peer = conn.plane_state
        reason = await self._endpoint(conn)
        if reason is not None:
            raise ConnectionError(reason)
        tag = peer.next_tag(len(views))
        await conn.send(Data(**{**header.__dict__, "tag": tag, "parts": len(views)}))
        ep = peer.endpoint
        await asyncio.gather(
            *[ep.send(byte_view(v), tag=tag + i, force_tag=True) for i, v in enumerate(views)]
        )

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
        ep = conn.plane_state.endpoint
        recvs = asyncio.gather(*[ep.recv(t, tag=tag + i, force_tag=True) for i, t in enumerate(targets)])
        try:
            await asyncio.wait_for(recvs, self.config.transfer_timeout)
        except asyncio.TimeoutError:
            ep.abort()  # cancels the posted receives, so nothing writes into the pages afterwards
            raise ConnectionError(
                f"ucx receive from {conn.peer} made no progress within transfer_timeout"
            ) from None

    def close_connection(self, conn: Connection) -> None:
        peer = conn.plane_state
        if isinstance(peer, _Peer) and peer.endpoint is not None:
            peer.endpoint.abort()
            peer.endpoint = None
