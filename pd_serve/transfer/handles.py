"""KVSender and KVReceiver: the scheduler thread's handles on one room.

Every method is cheap and never blocks on the network: reads are plain attribute reads of the
room (written only by the transfer loop), and actions are handed to the loop thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pd_serve.transfer.config import RoomState
from pd_serve.transfer.loop import TransferLoop
from pd_serve.transfer.room import Destination, Room


class _Handle:
    def __init__(self, room: Room, call: Callable[..., None], transfer: TransferLoop) -> None:
        self._room = room
        self._call = call  # runs a function on the transfer loop thread
        self._transfer = transfer

    @property
    def room(self) -> int:
        return self._room.room

    def poll(self) -> RoomState:
        """The room's state; Failed is reported only once nothing writes into its pages any more."""
        return self._room.visible_state

    @property
    def failure_reason(self) -> str | None:
        return self._room.failure_reason if self.poll() is RoomState.FAILED else None

    @property
    def peer_unreachable(self) -> bool:
        """Failed because the peer's transfer endpoint could not be reached (receiver only)."""
        return self._room.peer_unreachable and self.poll() is RoomState.FAILED

    def abort(self, reason: str = "aborted by the engine") -> None:
        """Fail the room here and tell the peer; a no-op once the room is terminal."""
        self._call(self._transfer.rooms.abort, self._room, reason)


class KVReceiver(_Handle):
    """Decode side: requests the room's KV into its destination pages."""

    @property
    def first_token(self) -> int | None:
        return self._room.first_token if self._room.state is RoomState.SUCCESS else None

    @property
    def first_token_logprobs(self) -> Any:
        return self._room.first_token_logprobs if self._room.state is RoomState.SUCCESS else None


class KVSender(_Handle):
    """Prefill side: learns the destination, sends pages (all or per layer range), then finishes."""

    def __init__(
        self, room: Room, call: Callable[..., None], transfer: TransferLoop, num_layers: int, num_pages: int
    ) -> None:
        super().__init__(room, call, transfer)
        self._num_layers, self._num_pages = num_layers, num_pages
        self._finished = False

    def destination(self) -> Destination | None:
        """Destination pages, expected tokens and prompt hash, once the receiver's request arrived."""
        return self._room.destination

    def send(
        self, src_page_ids: list[int], layers: range | tuple[int, int] | None = None, first_page: int = 0
    ) -> None:
        """Queue `src_page_ids` (all layers, or layers [first, end)) for destination pages
        `destination().page_ids[first_page : first_page + len(src_page_ids)]`."""
        dest = self._room.destination
        if self._finished:
            raise RuntimeError(f"room {self.room}: send() after finish()")
        if not self._room.live:
            return
        if dest is None:
            raise RuntimeError(f"room {self.room}: destination not known yet; poll() until WAITING_FOR_INPUT")
        span = self._layers(layers)
        pages = [int(p) for p in src_page_ids]
        if not pages or first_page < 0 or first_page + len(pages) > len(dest.page_ids):
            raise ValueError(
                f"room {self.room}: {len(pages)} source pages at first_page={first_page} do not fit "
                f"the {len(dest.page_ids)} destination pages"
            )
        bad = next((p for p in pages if not 0 <= p < self._num_pages), None)
        if bad is not None:
            raise ValueError(f"src_page_ids: page id {bad} is outside 0..{self._num_pages - 1}")
        self._call(self._transfer.send.queue_send, self._room, pages, span, first_page)

    def _layers(self, layers: range | tuple[int, int] | None) -> range:
        span = (
            range(self._num_layers)
            if layers is None
            else range(*layers)
            if isinstance(layers, tuple)
            else layers
        )
        if span.step != 1 or not 0 <= span.start < span.stop <= self._num_layers:
            raise ValueError(f"layers: {layers!r} is not a non-empty range within 0..{self._num_layers}")
        return span

    def finish(self, first_token: int, first_token_logprobs: Any = None) -> None:
        """Queue the completion message after every queued send; Success follows the receiver's ack."""
        if self._finished:
            raise RuntimeError(f"room {self.room}: finish() called twice")
        self._finished = True
        self._call(self._transfer.send.queue_finish, self._room, int(first_token), first_token_logprobs)
