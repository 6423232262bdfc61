"""Typed records of the bootstrap registry: what a node sends, what the service stores and returns.

These pydantic models are the wire contract shared by the service (`app.py`), the stores and the
client (`client.py`); the JSON shapes are documented in `app.py`. Models are strict (no silent
coercion of "16" to 16) and forbid unknown fields, so a typo is refused with the field named.
This module must stay import-light: the client and every node import it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from pd_serve.kv_layout import KVLayout

NODE_ID_MAX_LEN = 128
NODE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_NODE_ID_RE = re.compile(NODE_ID_PATTERN)

Role = Literal["prefill", "decode", "colocated"]
ROLES: tuple[Role, ...] = ("prefill", "decode", "colocated")

PositiveInt = Annotated[int, Field(ge=1, le=2**31)]
Count = Annotated[int, Field(ge=0, le=2**40)]
ShortStr = Annotated[str, Field(min_length=1, max_length=128)]


def is_valid_node_id(node_id: str) -> bool:
    """True when `node_id` is 1-128 characters of [A-Za-z0-9._-], starting with a letter or digit."""
    return bool(_NODE_ID_RE.fullmatch(node_id))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class TransferEndpoint(_Strict):
    """Where one TP rank of a node receives or sends KV pages (its position in the list is the rank)."""

    backend: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")]  # "ucx", "tcp", "fake"
    address: Annotated[str, Field(min_length=1, max_length=256)]  # "host:port" or a backend URL


class KVLayoutRecord(_Strict):
    """A `KVLayout` as the registry stores it (validated: strict types, bounds); a prefill and a
    decode node pair only when `KVLayout.difference` finds no field that differs."""

    architecture: ShortStr
    num_layers: PositiveInt
    num_kv_heads: PositiveInt
    head_dim: PositiveInt
    dtype: Annotated[str, Field(min_length=1, max_length=32)]
    page_size: PositiveInt
    config_hash: ShortStr

    def value(self) -> KVLayout:
        return KVLayout(**self.model_dump())


class Capacity(_Strict):
    total_pages: Count
    max_running_requests: PositiveInt


class Load(_Strict):
    running: Count = 0
    waiting: Count = 0
    free_pages: Count = 0
    queued: Count = 0  # requests waiting for admission (decode: for free KV pages); part of running


class NodeRegistration(_Strict):
    """The body of `PUT /v1/nodes/{node_id}`."""

    role: Role
    http_url: Annotated[str, Field(min_length=8, max_length=2048, pattern=r"^https?://\S+$")]
    transfer: Annotated[list[TransferEndpoint], Field(max_length=256, validate_default=True)] = []
    layout: KVLayoutRecord
    capacity: Capacity
    load: Load = Load()

    @field_validator("transfer")
    @classmethod
    def _transfer_needed(cls, value: list[TransferEndpoint], info: ValidationInfo) -> list[TransferEndpoint]:
        role = info.data.get("role")
        if role in ("prefill", "decode") and not value:
            raise ValueError(f"a {role} node needs at least one transfer endpoint (one per TP rank)")
        return value

    def same_identity(self, other: NodeRegistration) -> bool:
        """True when only `load` differs: a refresh, not a new registration."""
        return all(getattr(self, name) == getattr(other, name) for name in _IDENTITY_FIELDS)


_IDENTITY_FIELDS = tuple(name for name in NodeRegistration.model_fields if name != "load")


class HeartbeatBody(_Strict):
    """The optional body of `POST /v1/nodes/{node_id}/heartbeat`."""

    load: Load | None = None


class NodeRecord(NodeRegistration):
    """A stored node: its registration plus identity and wall-clock times (Unix seconds)."""

    node_id: Annotated[str, Field(pattern=NODE_ID_PATTERN)]
    registered_at: float  # changes only on a new registration: part of the ETag
    updated_at: float  # last PUT or heartbeat
    expires_at: float  # updated_at + the service's --node-ttl

    @property
    def ttl(self) -> float:
        return self.expires_at - self.updated_at


class NodeList(_Strict):
    """The body of `GET /v1/nodes`."""

    nodes: list[NodeRecord]
    etag: str


class PairCheck(_Strict):
    """The body of `GET /v1/pairs/check`: `field` is the first differing field, None when compatible."""

    compatible: bool
    prefill: str
    decode: str
    field: str | None = None
    prefill_value: str | int | None = None
    decode_value: str | int | None = None
    reason: str | None = None


def list_etag(records: Iterable[NodeRecord]) -> str:
    """A tag of the membership: changes on a join, leave, expiry or re-registration, not on heartbeats."""
    parts = sorted(f"{r.node_id}@{r.registered_at!r}" for r in records)
    return hashlib.sha1("\n".join(parts).encode(), usedforsecurity=False).hexdigest()[:20]


def check_pair(prefill: NodeRecord, decode: NodeRecord) -> PairCheck:
    """Compare roles, then the layouts (`KVLayout.difference`), then the TP size."""
    if prefill.role == "decode" or decode.role == "prefill":
        return _mismatch(
            prefill,
            decode,
            "role",
            prefill.role,
            decode.role,
            f"roles cannot pair: prefill node is {prefill.role}, decode node is {decode.role}",
        )
    diff = prefill.layout.value().difference(decode.layout.value())
    if diff is not None:
        name, p, d = diff
        return _mismatch(
            prefill, decode, f"layout.{name}", p, d, f"layout.{name} differs: prefill {p!r}, decode {d!r}"
        )
    p_tp, d_tp = len(prefill.transfer), len(decode.transfer)
    if p_tp != d_tp:
        return _mismatch(
            prefill,
            decode,
            "tp_size",
            p_tp,
            d_tp,
            f"tp_size differs: prefill has {p_tp}, decode {d_tp} transfer endpoints",
        )
    return PairCheck(compatible=True, prefill=prefill.node_id, decode=decode.node_id)


def _mismatch(
    prefill: NodeRecord, decode: NodeRecord, field: str, p: str | int, d: str | int, reason: str
) -> PairCheck:
    return PairCheck(
        compatible=False,
        prefill=prefill.node_id,
        decode=decode.node_id,
        field=field,
        prefill_value=p,
        decode_value=d,
        reason=reason,
    )
