"""The data plane interface and the tcp data plane: how KV bytes travel after a Data header.

Every plane runs on the transfer engine's event loop. A plane writes into destination pages only
while `live()` is true, and returns only when no write into them can happen any more.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from pd_serve.transfer.config import TransferConfig
from pd_serve.transfer.connection import Connection
from pd_serve.transfer.messages import Data


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

    def __init__(self, config: TransferConfig) -> None:
        self.config = config
        self.pools: Any = None  # the engine's PoolSet, set before start()

    async def start(self) -> None:
        return None

    def hello_fields(self, conn: Connection | None) -> dict[str, Any]:
        return {}

    async def on_hello(self, conn: Connection, peer: Any) -> str | None:
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


def make_plane(config: TransferConfig, pools: Any) -> DataPlane:
    plane: DataPlane
    if config.backend == "tcp":
        plane = TcpPlane(config)
    elif config.backend == "cma":
        from pd_serve.transfer.cma_plane import CmaPlane

        plane = CmaPlane(config)
    else:
        from pd_serve.transfer.ucx_plane import UcxPlane

        plane = UcxPlane(config)
    plane.pools = pools
    return plane
