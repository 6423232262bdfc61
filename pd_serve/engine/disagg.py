"""The prefill and decode `KVConnector`s: a disaggregated request's life around its room.

Prefill (`PrefillConnector`): a request with a room waits, outside the scheduler, until the decode
node's receiver for that room has arrived (back-pressure: no KV is computed that has nowhere to
go) and its token count and prompt hash match ours. It is then prefilled like any request with
max_tokens=1; once its first token is sampled (`take_sampled`) the scheduler hands its pages over,
they are sent with the first token, and they stay pinned until the room is Success or Failed.
Then they are released (full pages stay in the prefix cache).

Decode (`DecodeConnector`): a request with a room gets pages for its prompt as soon as the pool
has them plus `reserve_tokens` of headroom, then opens a receiver towards the prefill node. On
Success the request's prompt counts as computed and the engine commits the first token; on Failed
its pages are freed and it finishes with the reason. Pages are freed only once the room is
terminal, so no late write can land in reused pages.

Neither blocks: `poll()` is called once per engine step and reads room states. Neither touches the
scheduler's queues or page pool directly, only its small page methods (`pages_for`,
`allocate_pages`, `release_pages`, `take_cached_prefix`, `hand_over`, `adopt_prompt`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from pd_serve.engine.connector import (
    AbortResult,
    ConnectorStats,
    Event,
    KVReceived,
    KVSent,
    Room,
    RoomConnector,
    RoomFailed,
    logprobs_from_wire,
    logprobs_to_wire,
    prompt_hash,
)
from pd_serve.engine.messages import PDSpec
from pd_serve.engine.request import Request
from pd_serve.engine.sampler import TokenLogprobs
from pd_serve.engine.scheduler import RequestRejected, Scheduler
from pd_serve.openai_errors import ErrorCode
from pd_serve.transfer import Destination, KVReceiver, KVSender, RoomState, TransferEngine


@dataclass(kw_only=True)
class _SendRoom(Room):
    handle: KVSender


@dataclass(kw_only=True)
class _ReceiveRoom(Room):
    peer: str
    handle: KVReceiver | None = None  # opened once pages are allocated
    cached: list[int] = field(default_factory=list)  # prompt pages from this node's own prefix cache


class PrefillConnector(RoomConnector):
    def __init__(self, transfer: TransferEngine, scheduler: Scheduler) -> None:
        super().__init__(transfer, scheduler)
        self.waiting: dict[str, _SendRoom] = {}  # for the receiver's destination
        self.computing: dict[str, _SendRoom] = {}  # in the scheduler
        self.sending: dict[str, _SendRoom] = {}  # pages handed over, room not yet terminal
        self.pages_sent = 0

    @property
    def num_in_flight(self) -> int:
        return len(self.waiting) + len(self.computing) + len(self.sending)

    @property
    def num_queued(self) -> int:
        return len(self.waiting)

    def stats(self) -> ConnectorStats:
        return self._stats(kv_pages_sent=self.pages_sent)

    def add(self, request: Request, pd: PDSpec) -> None:
        request.params = replace(request.params, max_tokens=1, stop=(), ignore_eos=True)
        self.scheduler.check_fits(request.num_prompt_tokens, 1)
        handle = self.transfer.sender(pd.room)
        self.waiting[request.request_id] = _SendRoom(request=request, handle=handle, room=pd.room)

    def poll(self) -> list[Event]:
        events: list[Event] = []
        self._poll_waiting(events)
        for rid, r in list(self.computing.items()):
            if r.handle.poll() is RoomState.FAILED:  # the decode side gave up: stop computing for it
                del self.computing[rid]
                self.scheduler.abort(rid)
                self.rooms_failed += 1
                events.append(RoomFailed(r.request, r.handle.failure_reason or "transfer failed"))
        for rid, r in list(self.sending.items()):
            state = r.handle.poll()
            if not state.terminal:
                continue
            del self.sending[rid]
            self.scheduler.release_pages(r.pages)
            if r.aborted is not None or state is RoomState.FAILED:
                self.rooms_failed += 1
                events.append(RoomFailed(r.request, r.aborted or r.handle.failure_reason or "transfer failed"))
            else:
                self.rooms_succeeded += 1
                r.times["done"] = time.monotonic()
                events.append(KVSent(r.request, _timings(r.times)))
        return events

    def _poll_waiting(self, events: list[Event]) -> None:
        """Rooms whose receiver arrived (and fits) go to the scheduler; failed ones end."""
        for rid, r in list(self.waiting.items()):
            state = r.handle.poll()
            if state.terminal:  # failed (a success cannot come before we sent)
                del self.waiting[rid]
                self.rooms_failed += 1
                reason = r.aborted or r.handle.failure_reason or f"room {r.handle.room} {state}"
                events.append(RoomFailed(r.request, reason))
                continue
            dest = r.handle.destination()
            if dest is None:
                continue
            del self.waiting[rid]
            mismatch = self._check(r.request, dest)
            if mismatch is not None:
                r.handle.abort(mismatch)
                self.rooms_failed += 1
                events.append(RoomFailed(r.request, mismatch))
                continue
            r.times["destination"] = time.monotonic()
            self.scheduler.add(r.request)
            self.computing[rid] = r

    def _check(self, req: Request, dest: Destination) -> str | None:
        """Why the destination does not fit this request, or None. The decode node may already hold
        a prefix in its own cache: it then asks only for the tokens after its cached pages."""
        if dest.prompt_hash != prompt_hash(req.prompt_token_ids):
            return "prompt mismatch: prefill and decode nodes tokenized different prompts (hash differs)"
        skip = self._skip_pages(req, dest)
        if skip < 0 or dest.expected_tokens != req.num_prompt_tokens - skip * self.scheduler.page_size:
            return (f"prompt length mismatch: decode node expects {dest.expected_tokens} tokens in "
                    f"{len(dest.page_ids)} pages, prefill node has {req.num_prompt_tokens}")
        return None

    def _skip_pages(self, req: Request, dest: Destination) -> int:
        """Leading prompt pages the decode node has cached and does not ask for."""
        return self.scheduler.pages_for(req.num_prompt_tokens) - len(dest.page_ids)

    def take_sampled(self, request: Request, token: int, logprobs: TokenLogprobs | None) -> bool:
        """The request's prompt is computed and its first token sampled: send pages and token."""
        r = self.computing.pop(request.request_id, None)
        if r is None:
            return False
        r.times["computed"] = time.monotonic()
        num_prompt_pages = self.scheduler.pages_for(request.num_prompt_tokens)
        r.pages = self.scheduler.hand_over(request)
        dest = r.handle.destination()
        assert dest is not None  # it was there when the request went to the scheduler
        skip = self._skip_pages(request, dest)
        r.handle.send(r.pages[skip:num_prompt_pages])
        r.handle.finish(token, logprobs_to_wire(logprobs))
        self.pages_sent += num_prompt_pages - skip
        self.sending[request.request_id] = r
        request.output_token_ids.append(token)
        return True

    def abort(self, request_id: str, reason: str) -> AbortResult:
        for table in (self.waiting, self.sending):
            r = table.get(request_id)
            if r is not None:
                r.aborted = r.aborted or reason
                r.handle.abort(reason)
                return AbortResult.ENDS_IN_POLL
        r = self.computing.pop(request_id, None)
        if r is not None:
            r.handle.abort(reason)
        return AbortResult.IN_SCHEDULER


class DecodeConnector(RoomConnector):
    def __init__(
        self, transfer: TransferEngine, scheduler: Scheduler, reserve_tokens: int, queue_timeout: float,
        vocab_size: int,
    ) -> None:
        super().__init__(transfer, scheduler)
        self.reserve_tokens, self.queue_timeout = reserve_tokens, queue_timeout
        self.vocab_size = vocab_size
        self.pending: dict[str, _ReceiveRoom] = {}  # waiting for free pages, in arrival order
        self.receiving: dict[str, _ReceiveRoom] = {}
        self.pages_received = 0
        self.pages_reused = 0  # prompt pages served from this node's prefix cache instead

    @property
    def num_in_flight(self) -> int:
        return len(self.pending) + len(self.receiving)

    @property
    def num_queued(self) -> int:
        return len(self.pending)

    def stats(self) -> ConnectorStats:
        return self._stats(kv_pages_received=self.pages_received, kv_pages_reused=self.pages_reused)

    def add(self, request: Request, pd: PDSpec) -> None:
        if not pd.peer_endpoint:
            raise RequestRejected("pd", "a decode node needs the prefill node's transfer endpoint")
        self.scheduler.check_fits(request.num_prompt_tokens, request.params.max_tokens)
        self.pending[request.request_id] = _ReceiveRoom(request=request, room=pd.room, peer=pd.peer_endpoint)

    def take_sampled(self, request: Request, token: int, logprobs: TokenLogprobs | None) -> bool:
        return False  # a decode node's sampled tokens are its own

    def poll(self) -> list[Event]:
        events: list[Event] = []
        self._allocate(events)
        for rid, r in list(self.receiving.items()):
            assert r.handle is not None  # receiving: opened
            state = r.handle.poll()
            if not state.terminal:
                continue
            del self.receiving[rid]
            if state is RoomState.SUCCESS and r.aborted is None:
                self.scheduler.adopt_prompt(r.request, r.cached + r.pages, len(r.cached))
                self.rooms_succeeded += 1
                self.pages_received += len(r.pages)
                self.pages_reused += len(r.cached)
                events.append(self._received(r.request, r.handle))
            else:
                self.scheduler.release_pages(r.cached + r.pages)
                self.rooms_failed += 1
                unreachable = r.aborted is None and r.handle.peer_unreachable  # the prefill node's fault
                code = ErrorCode.PREFILL_UNREACHABLE if unreachable else None
                events.append(RoomFailed(r.request, r.aborted or r.handle.failure_reason or f"transfer {state}", code))
        return events

    def _received(self, req: Request, handle: KVReceiver) -> Event:
        """The first token came with the KV: the engine commits it as if sampled here."""
        first = handle.first_token
        assert first is not None  # set once the room is Success
        token = int(first)
        if not 0 <= token < self.vocab_size:  # the peer proved the token, not its sanity
            self.scheduler.release(req)
            why = f"prefill peer sent first token {token}, outside the vocabulary of {self.vocab_size}"
            return RoomFailed(req, why)
        wire = handle.first_token_logprobs
        return KVReceived(req, token, logprobs_from_wire(token, wire) if req.params.logprobs is not None else None)

    def _allocate(self, events: list[Event]) -> None:
        now = time.monotonic()
        for rid, r in list(self.pending.items()):
            req = r.request
            need = self.scheduler.pages_for(req.num_prompt_tokens)
            headroom = self.scheduler.pages_for(min(self.reserve_tokens, req.params.max_tokens))
            pages = self.scheduler.allocate_pages(need, reserve=headroom)
            if pages is None:
                if now - r.times["arrived"] > self.queue_timeout:
                    del self.pending[rid]
                    why = (f"queued {self.queue_timeout:.0f} s for {need} free KV pages, in vain "
                           "(queue_timeout, --queue-timeout)")
                    events.append(RoomFailed(req, why))
                    continue
                break  # first come, first served
            del self.pending[rid]
            self._open(r, pages, events)

    def _open(self, r: _ReceiveRoom, pages: list[int], events: list[Event]) -> None:
        """Reuse what the prefix cache holds, ask the prefill node for the rest."""
        req = r.request
        r.cached = self.scheduler.take_cached_prefix(req)
        surplus = len(r.cached)  # pages allocated for the prompt that the cache made unnecessary
        self.scheduler.release_pages(pages[len(pages) - surplus :])
        r.pages = pages[: len(pages) - surplus]
        wanted = req.num_prompt_tokens - len(r.cached) * self.scheduler.page_size
        try:
            r.handle = self.transfer.receiver(r.room, r.peer, r.pages, wanted, prompt_hash(req.prompt_token_ids))
        except ValueError as exc:  # duplicate room, bad endpoint
            self.scheduler.release_pages(r.cached + r.pages)
            events.append(RoomFailed(req, str(exc)))
            return
        self.receiving[req.request_id] = r

    def abort(self, request_id: str, reason: str) -> AbortResult:
        if self.pending.pop(request_id, None) is not None:
            return AbortResult.ENDED  # no room was opened yet
        r = self.receiving.get(request_id)
        if r is None:
            return AbortResult.IN_SCHEDULER
        assert r.handle is not None
        r.aborted = r.aborted or reason
        r.handle.abort(reason)
        return AbortResult.ENDS_IN_POLL


def _timings(t: dict[str, float]) -> dict[str, float]:
    arrived = t["arrived"]
    return {
        "wait_for_decode_s": t.get("destination", arrived) - arrived,
        "prefill_s": t.get("computed", arrived) - t.get("destination", arrived),
        "transfer_s": t.get("done", arrived) - t.get("computed", arrived),
        "total_s": t.get("done", arrived) - arrived,
    }
