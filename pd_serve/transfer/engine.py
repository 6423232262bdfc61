"""TransferEngine: one per node; owns the endpoint, the registered pools and the transfer thread.

All network I/O runs on the engine's own thread and asyncio loop, which sleeps while nothing
happens. The public methods are called from the scheduler thread; they validate, create the room
handle and hand the work to the loop, and never wait on the network. See the package docstring for
the call order.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections import OrderedDict
from typing import Any

import torch

from pd_serve.intmath import div_ceil
from pd_serve.kv_layout import KVLayout
from pd_serve.transfer.config import TransferConfig
from pd_serve.transfer.handles import KVReceiver, KVSender
from pd_serve.transfer.layout import PoolSet
from pd_serve.transfer.loop import TransferLoop
from pd_serve.transfer.plane import start_planes
from pd_serve.transfer.room import Destination, Room

START_TIMEOUT_S = 60.0


class TransferEngine:
    def __init__(
        self, config: TransferConfig, pools: list[tuple[torch.Tensor, torch.Tensor]], fingerprint: Any
    ) -> None:
        self.config = config
        self.fingerprint = KVLayout.from_value(fingerprint)
        self.pools = PoolSet(list(pools), self.fingerprint)
        if self.pools.device.type != "cpu" and config.backend in ("tcp", "cma"):
            raise ValueError(
                f"backend: {config.backend!r} moves host memory only; use ucx for {self.pools.device} pools"
            )
        self._transfer: TransferLoop | None = None  # lives on the loop thread, from _startup()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._port = 0
        self._lock = threading.Lock()
        # per role: the rooms claimed and not yet seen terminal, and every room id used (bounded),
        # so that a duplicate id is refused without keeping finished Room objects (and what they
        # reference: connections, destinations, tasks) alive for finished_rooms_kept rooms
        self._live: dict[str, dict[int, Room]] = {"sender": {}, "receiver": {}}
        self._used: dict[str, OrderedDict[int, None]] = {"sender": OrderedDict(), "receiver": OrderedDict()}

    # ---- lifecycle ------------------------------------------------------------------------

    def start(self) -> TransferEngine:
        if self._thread is not None:
            raise RuntimeError("TransferEngine.start() called twice")
        self._thread = threading.Thread(target=self._run, name="pd-transfer", daemon=True)
        self._thread.start()
        if not self._started.wait(START_TIMEOUT_S):
            raise TimeoutError(f"transfer engine did not start within {START_TIMEOUT_S} s")
        if self._start_error is not None:
            raise RuntimeError(f"transfer engine failed to start: {self._start_error}") from self._start_error
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            loop.run_until_complete(self._startup())
        except BaseException as exc:  # reported to start(); the thread ends
            self._start_error = exc
            self._started.set()
            loop.close()
            return
        self._started.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _startup(self) -> None:
        planes = await start_planes(self.config, self.pools)
        lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind((self.config.host, self.config.port))
        lsock.listen(512)
        lsock.setblocking(False)
        self._lsock = lsock
        self._port = lsock.getsockname()[1]
        self._transfer = TransferLoop(self.config, self.pools, planes)
        self._transfer.spawn(self._transfer.serve(lsock))

    @property
    def endpoint(self) -> str:
        """Address to publish in the bootstrap registry, e.g. `auto://127.0.0.1:40123`."""
        if not self._port:
            raise RuntimeError("endpoint is known only after start()")
        return f"{self.config.backend}://{self.config.host}:{self._port}"

    def close(self, timeout: float = 10.0) -> None:
        """Stop at once, without waiting for rooms in flight: cancel the loop's tasks, close every
        connection (the rooms bound to one fail) and data plane, stop the loop, join the thread."""
        loop, transfer = self._loop, self._transfer
        if loop is None or self._thread is None or not self._thread.is_alive():
            return

        async def shutdown() -> None:
            if transfer is not None:
                await transfer.close()
            self._lsock.close()
            loop.stop()

        loop.call_soon_threadsafe(lambda: loop.create_task(shutdown()))
        self._thread.join(timeout)

    def __enter__(self) -> TransferEngine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- rooms -----------------------------------------------------------------------------

    def _call(self, fn: Any, *args: Any) -> None:
        if self._loop is None or self._loop.is_closed():
            raise RuntimeError("transfer engine is not running; call start() first")
        self._loop.call_soon_threadsafe(fn, *args)

    def _claim(self, role: str, room: Room) -> None:
        live, used = self._live[role], self._used[role]
        with self._lock:
            for rid in [rid for rid, r in live.items() if not r.live]:
                del live[rid]
            if room.room in live or room.room in used:
                raise ValueError(
                    f"room {room.room}: already used by a {role} on this engine (duplicate room id)"
                )
            live[room.room] = room
            used[room.room] = None
            while len(used) > self.config.finished_rooms_kept:
                used.popitem(last=False)

    def receiver(
        self, room: int, peer_endpoint: str, dst_page_ids: list[int], expected_tokens: int, prompt_hash: str
    ) -> KVReceiver:
        """Decode side: request `room`'s KV from the prefill engine at `peer_endpoint`."""
        pages = [int(p) for p in dst_page_ids]
        self.pools.check_pages(pages, "dst_page_ids")
        if len(set(pages)) != len(pages):
            raise ValueError("dst_page_ids: contains a page id twice")
        needed = div_ceil(int(expected_tokens), self.fingerprint.page_size)
        if expected_tokens < 1 or needed > len(pages):
            raise ValueError(
                f"expected_tokens: {expected_tokens} needs {needed} pages, dst_page_ids has {len(pages)}"
            )
        record = Room(
            int(room),
            "receiver",
            self.config,
            destination=Destination(pages, int(expected_tokens), prompt_hash),
        )
        self._claim("receiver", record)
        transfer = self._running()
        self._call(transfer.receive.add, record, peer_endpoint)
        return KVReceiver(record, self._call, transfer)

    def sender(self, room: int) -> KVSender:
        """Prefill side: the handle for `room`; its destination arrives from the receiver."""
        record = Room(int(room), "sender", self.config)
        self._claim("sender", record)
        transfer = self._running()
        self._call(transfer.send.add, record)
        return KVSender(record, self._call, transfer, self.pools.num_layers, self.pools.num_pages)

    def _running(self) -> TransferLoop:
        if self._transfer is None:
            raise RuntimeError("transfer engine is not running; call start() first")
        return self._transfer

    @property
    def backends(self) -> list[str]:
        """The data planes this engine offers, best first (known after start())."""
        return list(self._transfer.planes) if self._transfer is not None else []

    def peers(self) -> dict[str, str]:
        """Open control connections ("to <endpoint>" / "from <address>") and the plane each uses."""
        return dict(self._transfer.peer_backends) if self._transfer is not None else {}

    def plane_stats(self) -> dict[str, dict[str, int]]:
        """Per offered plane: open connections, rooms succeeded and failed on it since start."""
        transfer = self._transfer
        if transfer is None:
            return {}
        used = list(transfer.peer_backends.values())
        rooms = dict(transfer.rooms.plane_rooms)
        return {
            name: {
                "connections": used.count(name),
                "rooms_succeeded": rooms.get((name, "succeeded"), 0),
                "rooms_failed": rooms.get((name, "failed"), 0),
            }
            for name in transfer.planes
        }

    def stats(self) -> dict[str, int]:
        """Counters (dropped_messages, failed_rooms, sent_bytes, ...) and the live room gauges
        (live_senders, live_receivers, pending_room_requests: 0 when idle); a snapshot, may lag."""
        transfer = self._transfer
        if transfer is None:
            return {}
        return {**transfer.stats, **transfer.gauges()}
