"""The prefill and decode roles' backends: an engine with a transfer engine, kept in the registry.

Both extend the colocated backend (same engine process, same `EngineClient`) with:
- a `DisaggConfig`, so the engine starts a `TransferEngine` and reports its endpoint;
- registration in the bootstrap service (`NodeKeeper`: register, heartbeat with the engine's load,
  re-register after a bootstrap restart, leave when a drain starts or on shutdown).

Prefill node: serves only requests that carry `pd`; the engine computes the prompt once the decode
node's receiver for the room has arrived, pushes the KV and the first token, and the request ends
with the room's timings. Decode node: with `pd`, it resolves the prefill node's transfer endpoint
(bootstrap record, or the prefill node's `/server_info` when `pd.prefill_url` is given and there
is no bootstrap) and receives the prompt's KV; without `pd` it serves the request alone
(conditional disaggregation: it prefills locally).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from pd_serve.config import DisaggConfig, EngineConfig
from pd_serve.engine import messages as m
from pd_serve.engine.messages import EngineReady
from pd_serve.engine.sampling_params import SamplingParams
from pd_serve.kv_layout import KVLayout
from pd_serve.openai_errors import ErrorCode
from pd_serve.server.backend import ColocatedBackend
from pd_serve.server.errors import bad_request
from pd_serve.server.schemas import PDParams
from pd_serve.server.sglang_bootstrap import PrefillDirectory

log = logging.getLogger(__name__)
LOAD_REPORT_S = 1.0  # at most this long between load reports (heartbeats), however long the TTL


class IncompatibleNode(RuntimeError):
    pass


def _layout_difference(mine: KVLayout, theirs: KVLayout, node_id: str) -> str | None:
    """The first differing layout field, named, or None when the two nodes can pair."""
    diff = mine.difference(theirs)
    if diff is None:
        return None
    return f"{diff.field} is {diff.theirs!r} on node {node_id!r} and {diff.mine!r} here"


@dataclass(frozen=True)
class Registration:
    """How this node appears in the bootstrap registry."""

    bootstrap_url: str | None
    node_id: str
    http_url: str
    token: str | None = field(default=None, repr=False)  # the cluster token; never logged


class _RoleBackend(ColocatedBackend):
    role = "disaggregated"

    def __init__(self, config: EngineConfig, disagg: DisaggConfig, registration: Registration) -> None:
        super().__init__(config, disagg)
        self.disagg = disagg
        self.registration = registration
        self.info: EngineReady | None = None
        self._bootstrap: Any = None
        self._keeper: Any = None

    async def start(self) -> EngineReady:
        self.info = await self.client.start()
        return self.info

    async def join(self) -> None:
        """Register once the whole node is ready, not once its engine is: the frontend sends work as
        soon as it sees the entry, and the API process may still be loading its tokenizer."""
        if self.registration.bootstrap_url:
            try:
                await self._register()
            except BaseException:
                await self.client.shutdown()
                raise

    async def shutdown(self) -> None:
        await self.leave()
        if self._bootstrap is not None:
            await self._bootstrap.aclose()
        await super().shutdown()

    async def leave(self) -> None:
        """Stop heartbeating and leave the registry, so the frontend pairs this node no more; the
        bootstrap client stays open for the peer look-ups of requests still in flight."""
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            await keeper.stop(leave=True)
            log.info("left the bootstrap registry as %s node %r", self.disagg.role, self.registration.node_id)

    async def _register(self) -> None:
        from pd_serve.bootstrap.client import BootstrapClient, NodeKeeper
        from pd_serve.bootstrap.records import Capacity, KVLayoutRecord, NodeRegistration, TransferEndpoint

        reg, info = self.registration, self.info
        assert reg.bootstrap_url is not None and info is not None and info.transfer_backend is not None
        assert info.transfer_endpoint is not None  # a prefill or decode engine has one
        self._bootstrap = BootstrapClient(reg.bootstrap_url, token=reg.token)
        body = NodeRegistration(
            role=self.disagg.role,  # type: ignore[arg-type]
            http_url=reg.http_url,
            transfer=[TransferEndpoint(backend=info.transfer_backend, address=info.transfer_endpoint)],
            layout=KVLayoutRecord(**info.layout.to_dict()),
            capacity=Capacity(total_pages=info.num_pages, max_running_requests=info.max_running_requests),
        )
        await self._check_peers()
        # the load (queued requests, free pages) steers the frontends' queue: report it every second
        self._keeper = NodeKeeper(self._bootstrap, reg.node_id, body, load_fn=self._load, interval=LOAD_REPORT_S)
        await self._keeper.start()
        log.info("registered as %s node %r at %s", self.disagg.role, reg.node_id, reg.bootstrap_url)

    async def _check_peers(self) -> None:
        """Refuse to join when peers of the other role exist and none can exchange KV with us."""
        other = "decode" if self.disagg.role == "prefill" else "prefill"
        peers = (await self._bootstrap.list_nodes(role=other)).nodes
        assert self.info is not None
        problems = [_layout_difference(self.info.layout, p.layout.value(), p.node_id) for p in peers]
        if peers and all(problems):
            raise IncompatibleNode(
                f"refusing to join as a {self.disagg.role} node: no registered {other} node can exchange KV "
                f"with this one; {problems[0]} (check --model, --page-size and --dtype)"
            )
        for problem in filter(None, problems):
            log.warning("some %s nodes cannot pair with this one: %s", other, problem)

    def _load(self) -> Any:
        from pd_serve.bootstrap.records import Load

        s = self.client.last_stats
        if s is None:
            return Load(running=0, waiting=0, free_pages=self.info.num_pages if self.info else 0)
        return Load(running=s.num_running + s.num_in_transfer, waiting=s.num_waiting, free_pages=s.num_free_pages,
                    queued=s.num_queued)


class PrefillBackend(_RoleBackend):
    role = "prefill"

    def check_pd(self, pd: PDParams | None) -> None:
        if pd is None:
            raise bad_request(
                "pd",
                "this is a prefill node: it serves only disaggregated requests, which carry "
                "'pd': {'room', 'prefill', 'decode'}; send whole requests to a decode or colocated node",
            )

    def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str, pd: PDParams | None = None
    ) -> AsyncIterator[m.RequestDelta]:
        self.check_pd(pd)
        assert pd is not None
        return self.client.generate(request_id, prompt_ids, params, pd=m.PDSpec(pd.room))


class DecodeBackend(_RoleBackend):
    role = "decode"

    def __init__(self, config: EngineConfig, disagg: DisaggConfig, registration: Registration) -> None:
        super().__init__(config, disagg, registration)
        self._peers: Any = None
        self._directory = PrefillDirectory(registration.token)  # pd.prefill_url -> transfer endpoint

    async def shutdown(self) -> None:
        await self._directory.aclose()
        await super().shutdown()

    def check_pd(self, pd: PDParams | None) -> None:
        if pd is not None and not self.registration.bootstrap_url and not pd.prefill_url:
            raise bad_request(
                "pd",
                "this decode node has no bootstrap service (--bootstrap): 'pd' must carry 'prefill_url', "
                "the prefill node's HTTP address",
            )

    async def generate(  # type: ignore[override]
        self, prompt_ids: list[int], params: SamplingParams, request_id: str, pd: PDParams | None = None
    ) -> AsyncIterator[m.RequestDelta]:
        self.check_pd(pd)
        spec = None
        if pd is not None:
            endpoint, problem, param, code = await self._peer_endpoint(pd)
            if endpoint is None:
                yield m.RequestDelta(request_id, [], "", True, "abort", error=problem, error_param=param,
                                     error_code=code)
                return
            spec = m.PDSpec(pd.room, endpoint)
        async for delta in self.client.generate(request_id, prompt_ids, params, pd=spec):
            if pd is not None and delta.error and delta.error_code == ErrorCode.PREFILL_UNREACHABLE:
                # the engine's room could not reach the prefill node's transfer endpoint: that node's
                # fault, not this node's, so the frontend retries without it
                if self._peers:
                    self._peers.invalidate(pd.prefill)  # a restarted prefill node listens on a new port
                if pd.prefill_url:
                    self._directory.invalidate(pd.prefill_url)
                delta = dataclasses.replace(delta, error=f"prefill node {pd.prefill!r}: {delta.error}")
            yield delta

    async def _peer_endpoint(self, pd: PDParams) -> tuple[str | None, str, str | None, str | None]:
        """The prefill node's transfer endpoint, or None, why not, and the refusal's error param and
        code: param "pd" for a bad request; no param for a cluster problem (a registry that cannot
        answer now: 503, and the frontend tries another pair). With the bootstrap service
        unreachable, the last record seen for the node is used."""
        if pd.prefill_url:  # the frontend's static mode, or smg's bootstrap_host:bootstrap_port
            assert self.info is not None
            return await self._directory.lookup(pd.prefill_url, self.info.layout)
        from pd_serve.bootstrap.client import BootstrapError, NodeNotFound, PeerCache

        if self._peers is None:
            self._peers = PeerCache(self._bootstrap)
        try:
            record = await self._peers.get(pd.prefill)
        except NodeNotFound as exc:
            problem = f"prefill node {pd.prefill!r} is not in the bootstrap registry: {exc}"
            return None, problem, None, ErrorCode.PREFILL_UNREACHABLE
        except BootstrapError as exc:
            stale = self._peers.cached(pd.prefill)
            if stale is None:
                problem = f"prefill node {pd.prefill!r}: the bootstrap registry cannot answer: {exc}"
                return None, problem, None, None
            record = stale
        if record.role != "prefill" or not record.transfer:
            return None, f"node {pd.prefill!r} is a {record.role} node, not a prefill node", "pd", None
        assert self.info is not None
        difference = _layout_difference(self.info.layout, record.layout.value(), pd.prefill)
        if difference is not None:
            return None, f"incompatible KV layout: {difference}", "pd", None
        return record.transfer[0].address, "", None, None
