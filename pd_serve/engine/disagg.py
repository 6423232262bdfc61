"""The engine's part in disaggregation: prefill-side and decode-side request handling around rooms.

Prefill side (`PrefillSide`): a request with a room waits, outside the scheduler, until the decode
node's receiver for that room has arrived (back-pressure: no KV is computed that has nowhere to
go) and its token count and prompt hash match ours. It is then prefilled like any request with
max_tokens=1; once its first token is sampled the scheduler hands its pages over, they are sent
with the first token, and they stay pinned until the room is Success or Failed. Then they are
released (full pages stay in the prefix cache).

Decode side (`DecodeSide`): a request with a room gets pages for its prompt as soon as the pool
has them plus `reserve_tokens` of headroom, then opens a receiver towards the prefill node. On
Success the first token is committed and the request joins the scheduler with its prompt already
computed; on Failed its pages are freed and it finishes with the reason. Pages are freed only once
the room is terminal, so no late write can land in reused pages.

Neither side blocks: `poll()` is called once per engine step and reads room states.
"""

from __future__ import annotations

import hashlib
import time
from array import array
from dataclasses import dataclass, field
from typing import Any

from pd_serve.engine.request import Request
from pd_serve.engine.scheduler import Scheduler
from pd_serve.transfer.config import RoomState


def prompt_hash(token_ids: list[int]) -> str:
    return hashlib.sha256(array("q", token_ids).tobytes()).hexdigest()[:16]


@dataclass
class Ready:
    """Decode side: a room succeeded; the request's first token arrived with its KV."""

    request: Request
    first_token: int
    first_token_logprobs: Any


@dataclass
class Failed:
    request: Request
    reason: str


@dataclass
class Sent:
    """Prefill side: the room succeeded; the request is done here."""

    request: Request
    timings: dict[str, float]


Event = Ready | Failed | Sent


@dataclass
class _Room:
    request: Request
    handle: Any = None  # KVSender or KVReceiver
    room: int = 0
    peer: str | None = None
    aborted: str | None = None  # reason, once the request was aborted while its room was live
    pages: list[int] = field(default_factory=list)
    cached: list[int] = field(default_factory=list)  # decode: prompt pages from its own prefix cache
    times: dict[str, float] = field(default_factory=lambda: {"arrived": time.monotonic()})


class PrefillSide:
    def __init__(self, transfer: Any, scheduler: Scheduler) -> None:
        self.transfer, self.scheduler = transfer, scheduler
        self.waiting: dict[str, _Room] = {}  # for the receiver's destination
        self.computing: dict[str, _Room] = {}  # in the scheduler
        self.sending: dict[str, _Room] = {}  # pages handed over, room not yet terminal
        self.pages_sent = 0
        self.rooms_succeeded = 0
        self.rooms_failed = 0

    def __len__(self) -> int:
        return len(self.waiting) + len(self.computing) + len(self.sending)

    def owns(self, request_id: str) -> bool:
        return request_id in self.computing

    def add(self, req: Request, room: int) -> None:
        self.scheduler.check_fits(req.num_prompt_tokens, 1)
        self.waiting[req.request_id] = _Room(req, self.transfer.sender(room), room=room)

    def poll(self) -> list[Event]:
        events: list[Event] = []
        for rid, r in list(self.waiting.items()):
            state = r.handle.poll()
            if state.terminal:  # failed (a success cannot come before we sent)
                del self.waiting[rid]
                self.rooms_failed += 1
                events.append(Failed(r.request, r.aborted or r.handle.failure_reason or f"room {r.handle.room} {state}"))
                continue
            dest = r.handle.destination()
            if dest is None:
                continue
            del self.waiting[rid]
            mismatch = self._check(r.request, dest)
            if mismatch is not None:
                r.handle.abort(mismatch)
                self.rooms_failed += 1
                events.append(Failed(r.request, mismatch))
                continue
            r.times["destination"] = time.monotonic()
            self.scheduler.add(r.request)
            self.computing[rid] = r
        for rid, r in list(self.computing.items()):
            if r.handle.poll() is RoomState.FAILED:  # the decode side gave up: stop computing for it
                del self.computing[rid]
                self.scheduler.abort(rid)
                self.rooms_failed += 1
                events.append(Failed(r.request, r.handle.failure_reason or "transfer failed"))
        for rid, r in list(self.sending.items()):
            state = r.handle.poll()
            if not state.terminal:
                continue
            del self.sending[rid]
            self.scheduler.pages.release(r.pages)
            if r.aborted is not None or state is RoomState.FAILED:
                self.rooms_failed += 1
                events.append(Failed(r.request, r.aborted or r.handle.failure_reason or "transfer failed"))
            else:
                self.rooms_succeeded += 1
                r.times["done"] = time.monotonic()
                events.append(Sent(r.request, _timings(r.times)))
        return events

    def _check(self, req: Request, dest: Any) -> str | None:
        """Why the destination does not fit this request, or None. The decode node may already hold
        a prefix in its own cache: it then asks only for the tokens after its cached pages."""
        if dest.prompt_hash != prompt_hash(req.prompt_token_ids):
            return "prompt mismatch: prefill and decode nodes tokenized different prompts (hash differs)"
        skip = self._skip_pages(req, dest)
        if skip < 0 or dest.expected_tokens != req.num_prompt_tokens - skip * self.scheduler.config.page_size:
            return (f"prompt length mismatch: decode node expects {dest.expected_tokens} tokens in "
                    f"{len(dest.page_ids)} pages, prefill node has {req.num_prompt_tokens}")
        return None

    def _skip_pages(self, req: Request, dest: Any) -> int:
        """Leading prompt pages the decode node has cached and does not ask for."""
        return -(-req.num_prompt_tokens // self.scheduler.config.page_size) - len(dest.page_ids)

    def first_token(self, req: Request, token: int, logprobs: Any) -> None:
        """The request's prompt is computed and its first token sampled: send pages and token."""
        r = self.computing.pop(req.request_id)
        r.times["computed"] = time.monotonic()
        num_prompt_pages = -(-req.num_prompt_tokens // self.scheduler.config.page_size)
        r.pages = self.scheduler.hand_over(req)
        dest = r.handle.destination()
        skip = self._skip_pages(req, dest)
        r.handle.send(r.pages[skip:num_prompt_pages])
        r.handle.finish(token, logprobs)
        self.pages_sent += num_prompt_pages - skip
        self.sending[req.request_id] = r

    def abort(self, request_id: str, reason: str) -> bool:
        """True if the request was ours; its handle is aborted and its end comes from poll()."""
        for table in (self.waiting, self.sending):
            r = table.get(request_id)
            if r is not None:
                r.aborted = r.aborted or reason
                r.handle.abort(reason)
                return True
        r = self.computing.pop(request_id, None)
        if r is not None:
            r.handle.abort(reason)
            return False  # the scheduler still holds it: the caller aborts it there
        return False


class DecodeSide:
    def __init__(self, transfer: Any, scheduler: Scheduler, reserve_tokens: int, page_wait_timeout: float) -> None:
        self.transfer, self.scheduler = transfer, scheduler
        self.reserve_tokens, self.page_wait_timeout = reserve_tokens, page_wait_timeout
        self.pending: dict[str, _Room] = {}  # waiting for free pages, in arrival order
        self.receiving: dict[str, _Room] = {}
        self.pages_received = 0
        self.pages_reused = 0  # prompt pages served from this node's prefix cache instead
        self.rooms_succeeded = 0
        self.rooms_failed = 0

    def __len__(self) -> int:
        return len(self.pending) + len(self.receiving)

    def add(self, req: Request, room: int, peer_endpoint: str) -> None:
        self.scheduler.check_fits(req.num_prompt_tokens, req.params.max_tokens)
        self.pending[req.request_id] = _Room(req, room=room, peer=peer_endpoint)

    def poll(self) -> list[Event]:
        events: list[Event] = []
        self._allocate(events)
        for rid, r in list(self.receiving.items()):
            state = r.handle.poll()
            if not state.terminal:
                continue
            del self.receiving[rid]
            if state is RoomState.SUCCESS and r.aborted is None:
                req = r.request
                req.page_ids = r.cached + r.pages
                req.num_computed_tokens = req.num_prompt_tokens
                self.scheduler.mark_hashed(req, len(r.cached))
                self.rooms_succeeded += 1
                self.pages_received += len(r.pages)
                self.pages_reused += len(r.cached)
                events.append(Ready(req, r.handle.first_token, r.handle.first_token_logprobs))
            else:
                self.scheduler.pages.release(r.cached + r.pages)
                self.rooms_failed += 1
                events.append(Failed(r.request, r.aborted or r.handle.failure_reason or f"transfer {state}"))
        return events

    def _allocate(self, events: list[Event]) -> None:
        page_size = self.scheduler.config.page_size
        now = time.monotonic()
        for rid, r in list(self.pending.items()):
            req = r.request
            need = -(-req.num_prompt_tokens // page_size)
            headroom = -(-min(self.reserve_tokens, req.params.max_tokens) // page_size)
            pages = None
            if self.scheduler.pages.num_free >= need + headroom:
                pages = self.scheduler.pages.allocate(need)
            if pages is None:
                if now - r.times["arrived"] > self.page_wait_timeout:
                    del self.pending[rid]
                    events.append(Failed(req, f"no free KV pages for {need} pages within {self.page_wait_timeout:.0f} s"))
                    continue
                break  # first come, first served
            del self.pending[rid]
            self._open(r, pages, events)

    def _open(self, r: _Room, pages: list[int], events: list[Event]) -> None:
        """Reuse what the prefix cache holds, ask the prefill node for the rest."""
        req = r.request
        r.cached = self.scheduler.take_cached_prefix(req)
        surplus = len(r.cached)  # pages allocated for the prompt that the cache made unnecessary
        self.scheduler.pages.release(pages[len(pages) - surplus :])
        r.pages = pages[: len(pages) - surplus]
        wanted = req.num_prompt_tokens - len(r.cached) * self.scheduler.config.page_size
        try:
            r.handle = self.transfer.receiver(r.room, r.peer, r.pages, wanted, prompt_hash(req.prompt_token_ids))
        except ValueError as exc:  # duplicate room, bad endpoint
            self.scheduler.pages.release(r.cached + r.pages)
            events.append(Failed(req, str(exc)))
            return
        self.receiving[req.request_id] = r

    def abort(self, request_id: str, reason: str) -> Request | None:
        """Abort a request still here; returns it if it ended now (no live room), else None."""
        r = self.pending.pop(request_id, None)
        if r is not None:
            return r.request
        r = self.receiving.get(request_id)
        if r is not None:
            r.aborted = r.aborted or reason
            r.handle.abort(reason)
        return None

    def owns(self, request_id: str) -> bool:
        return request_id in self.pending or request_id in self.receiving


def _timings(t: dict[str, float]) -> dict[str, float]:
    arrived = t["arrived"]
    return {
        "wait_for_decode_s": t.get("destination", arrived) - arrived,
        "prefill_s": t.get("computed", arrived) - t.get("destination", arrived),
        "transfer_s": t.get("done", arrived) - t.get("computed", arrived),
        "total_s": t.get("done", arrived) - arrived,
    }
