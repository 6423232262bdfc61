"""The data plane interface and the tcp data plane: how KV bytes travel after a Data header.

Every plane runs on the transfer engine's event loop. A plane writes into destination pages only
while `live()` is true, and returns only when no write into them can happen any more. A transfer
loop holds one or more planes (`start_planes`); each control connection uses the one its
handshake chose (`conn.plane`, see handshake.py). Per connection, in this order: `hello_fields`
(both Hellos), `refusal` (may this plane serve that peer at all: nothing is touched), `on_hello`
(set it up; on the receiver side before it chooses, on the sender side once chosen), then data,
then `close_connection`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from pd_serve.transfer.config import PLANES, TransferConfig
from pd_serve.transfer.connection import Connection
from pd_serve.transfer.messages import Data, Hello, HelloReply

log = logging.getLogger(__name__)


def byte_view(t: torch.Tensor) -> Any:
    """A contiguous tensor as bytes: a uint8 numpy array on CPU, a uint8 tensor on CUDA."""
    flat = t.reshape(-1).view(torch.uint8)
    return flat if flat.is_cuda else flat.numpy()


class DataPlane:
    """Base class; subclasses move the bytes. `gathers`: the sender may gather into staging;
    `stages_receive`: the receiver reads a staged message into staging and scatters it."""

    name = "base"
    gathers = True
    stages_receive = True
    needs_views = True  # False: the plane works from addresses (pools.regions), not tensor views
    host_only = True  # moves host memory only (False: device pools too)

    def __init__(self, config: TransferConfig) -> None:
        self.config = config
        self.pools: Any = None  # the engine's PoolSet, set before start()

    async def start(self) -> None:
        return None

    def hello_fields(self, conn: Connection, peer: Hello | None) -> dict[str, Any]:
        """Fields of our Hello (`peer` None: we open `conn`) or of our reply to `peer`'s Hello."""
        return {}

    def refusal(self, peer: Hello | HelloReply) -> str | None:
        """Why this plane cannot serve the peer that sent these handshake fields, or None."""
        return None

    async def on_hello(self, conn: Connection, peer: Hello | HelloReply) -> str | None:
        """Set up the plane for a new connection; returns a failure reason or None."""
        return None

    def data_refusal(self, header: Data, payload_len: int) -> str | None:
        """Why a Data header, already within the pools, cannot come from this plane's sender."""
        return None if payload_len == 0 else f"a {payload_len}-byte payload on the {self.name} plane"

    async def send_data(self, conn: Connection, header: Data, views: list[torch.Tensor]) -> None:
        raise NotImplementedError

    async def receive(
        self,
        conn: Connection,
        header: Data,
        payload_len: int,
        views: list[torch.Tensor],
        live: Callable[[], bool],
    ) -> bool:
        raise NotImplementedError

    async def discard(self, conn: Connection, header: Data, payload_len: int, part_bytes: list[int]) -> None:
        """Consume a Data message that no room will take; `part_bytes`: its regions' sizes."""
        await conn.discard(payload_len)

    def close_connection(self, conn: Connection) -> None:
        return None

    async def close(self) -> None:
        return None


class TcpPlane(DataPlane):
    """Bytes follow the Data header on the control socket: sendall from, recv_into the views."""

    name = "tcp"

    def data_refusal(self, header: Data, payload_len: int) -> str | None:
        if payload_len != header.nbytes:
            return f"a payload of {payload_len} bytes for a {header.nbytes}-byte header"
        return None

    async def send_data(self, conn: Connection, header: Data, views: list[torch.Tensor]) -> None:
        await conn.send(header, [byte_view(v) for v in views])

    async def receive(
        self,
        conn: Connection,
        header: Data,
        payload_len: int,
        views: list[torch.Tensor],
        live: Callable[[], bool],
    ) -> bool:
        if payload_len != sum(v.numel() * v.element_size() for v in views):
            raise ConnectionError(
                f"Data payload of {payload_len} bytes does not match its {header.nbytes}-byte header"
            )
        ok = True
        for view in views:
            ok = await conn.read_into(memoryview(byte_view(view)), live) and ok
        return ok


def new_plane(name: str, config: TransferConfig) -> DataPlane:
    if name == "tcp":
        return TcpPlane(config)
    if name == "cma":
        from pd_serve.transfer.cma_plane import CmaPlane

        return CmaPlane(config)
    from pd_serve.transfer.ucx_plane import UcxPlane

    return UcxPlane(config)


async def start_planes(config: TransferConfig, pools: Any) -> list[DataPlane]:
    """The planes this node offers, best first: the one `config.backend` forces, or for `auto`
    every plane that starts here and can move the pools (a plane that fails to start is left out,
    with a warning). Raises when none is left."""
    names = PLANES if config.backend == "auto" else (config.backend,)
    device = getattr(pools, "device", None)
    planes, why = [], []
    for name in names:
        plane = new_plane(name, config)
        if plane.host_only and device is not None and device.type != "cpu":
            why.append(f"{name} moves host memory only, the pools are on {device}")
            continue
        plane.pools = pools
        try:
            await plane.start()
        except Exception as exc:  # ImportError without ucxx; ucxx's own types when UCX finds no transport
            if config.backend != "auto":
                raise
            why.append(f"{name} did not start ({type(exc).__name__}: {exc})")
            log.warning("transfer backend %s is not available here (auto goes on without it): %s", name, exc)
            continue
        planes.append(plane)
    if not planes:
        raise RuntimeError(f"no transfer backend can serve this node: {'; '.join(why)} (--transfer-backend)")
    return planes
