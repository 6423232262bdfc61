"""Choosing where one request goes: a (prefill, decode) pair, or a decode node alone.

Rules, in order:
- a prompt shorter than `--local-prefill-threshold` characters goes to a decode (or colocated) node
  alone, which prefills it locally (conditional disaggregation);
- when no prefill node is known at all (a decode-only or colocated deployment), likewise;
- otherwise the prefill policy picks among prefill nodes that have at least one compatible decode
  node, then the decode policy among the decode nodes compatible with it (least_load for
  prefix_aware: the prefix lives on the prefill side). Colocated nodes serve alone when no pair exists.
Only nodes whose breaker lets a request through and that this request has not already failed on
are candidates; `choose` takes the breakers' (half-open probe) slots of the nodes it returns.
"""

from __future__ import annotations

from dataclasses import dataclass

from pd_serve.frontend.config import FrontendConfig
from pd_serve.frontend.nodes import Node, NodeSet, compatible
from pd_serve.frontend.policies import LeastLoad, Policy, make_policy


class NoPair(Exception):
    """No node (pair) can take the request now; the message says why, for the 503 body."""


@dataclass(frozen=True)
class Choice:
    decode: Node
    prefill: Node | None  # None: the decode node prefills locally

    @property
    def node_ids(self) -> tuple[str, ...]:
        return (self.decode.node_id,) if self.prefill is None else (self.prefill.node_id, self.decode.node_id)


class Router:
    def __init__(self, config: FrontendConfig, nodes: NodeSet) -> None:
        self.config = config
        self.nodes = nodes
        self.prefill_policy: Policy = make_policy(config.policy, config.prefix_chars, config.prefix_balance)
        self.decode_policy: Policy = (
            LeastLoad() if config.policy == "prefix_aware" else make_policy(config.policy)
        )

    def choose(self, prompt: str, exclude: frozenset[str] = frozenset()) -> Choice:
        choice = self._select(prompt, exclude)
        for node_id in choice.node_ids:
            self.nodes.breaker(node_id).acquire()
        return choice

    def _candidates(self, exclude: frozenset[str], *roles: str) -> list[Node]:
        return [n for n in self.nodes.of_role(*roles) if n.node_id not in exclude and self.nodes.available(n)]

    def _select(self, prompt: str, exclude: frozenset[str]) -> Choice:
        short = len(prompt) < self.config.local_prefill_threshold
        if short or not self.nodes.of_role("prefill"):
            return self._alone(prompt, exclude, self._candidates(exclude, "decode", "colocated"))
        decodes = self._candidates(exclude, "decode")
        prefills = [p for p in self._candidates(exclude, "prefill") if any(compatible(p, d) for d in decodes)]
        if not prefills:
            colocated = self._candidates(exclude, "colocated")
            if colocated:
                return self._alone(prompt, exclude, colocated)
            raise NoPair(self._why_no_pair(exclude))
        prefill = self.prefill_policy.pick(prefills, self.nodes.load_of, prompt)
        matching = [d for d in decodes if compatible(prefill, d)]
        matching = [d for d in matching if not self.nodes.full(d)] or matching  # prefer room over a queue
        return Choice(decode=self.decode_policy.pick(matching, self.nodes.load_of, prompt), prefill=prefill)

    def decode_has_room(self) -> bool:
        """A request can go on now: some live decode-capable node is not full, or none is known (the
        choice then says why not)."""
        decodes = [n for n in self.nodes.of_role("decode", "colocated") if self.nodes.available(n)]
        return not decodes or any(not self.nodes.full(n) for n in decodes)

    def _alone(self, prompt: str, exclude: frozenset[str], decodes: list[Node]) -> Choice:
        if not decodes:
            raise NoPair(self._why_no_pair(exclude))
        return Choice(decode=self.decode_policy.pick(decodes, self.nodes.load_of, prompt), prefill=None)

    def _why_no_pair(self, exclude: frozenset[str]) -> str:
        prefills, decodes = self.nodes.of_role("prefill"), self.nodes.of_role("decode", "colocated")
        if not decodes:
            return "no decode node is live; start one (pd-serve decode) or check --bootstrap / --decode"
        if exclude:
            return f"no other node pair to try after failures on {', '.join(sorted(exclude))}"
        if all(not self.nodes.available(n) for n in prefills + decodes):
            return "every node's circuit breaker is open after consecutive failures; retry shortly"
        if not any(compatible(p, d) for p in prefills for d in decodes):
            return (
                f"no compatible prefill/decode pair among {len(prefills)} prefill and {len(decodes)} decode "
                "nodes: their KV layouts (model, dtype, page size) or TP sizes differ"
            )
        return "no available prefill/decode pair now (circuit breakers open); retry shortly"
