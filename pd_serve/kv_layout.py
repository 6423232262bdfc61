"""The KV layout: what a prefill and a decode node must agree on to exchange KV pages.

One frozen value (`KVLayout`) and one compatibility check (`KVLayout.difference`), used by the
engine (which derives it from its pools), the transfer layer (which refuses a peer whose layout
differs), the bootstrap registry (pair checks) and the frontend (pairing). It imports nothing
from pd_serve, so every package may use it; it must never learn about tensors or requests.
- `KVLayout.from_value(dict or object)`: build one from the wire or from another layout object;
- `difference(theirs)`: the first differing field (in `LAYOUT_FIELDS` order), or None;
- `mismatch(theirs)`: the same, as a sentence a person can read.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, NamedTuple

# The fields, in the order a compatibility check compares them.
LAYOUT_FIELDS = ("architecture", "num_layers", "num_kv_heads", "head_dim", "dtype", "page_size", "config_hash")


class LayoutError(ValueError):
    """A layout could not be built: the message names the missing field(s)."""


class LayoutDifference(NamedTuple):
    field: str
    mine: Any
    theirs: Any


@dataclass(frozen=True)
class KVLayout:
    """Per layer one K and one V pool `[num_pages, page_size, num_kv_heads, head_dim]` in `dtype`."""

    architecture: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "bfloat16"
    page_size: int
    config_hash: str

    @classmethod
    def from_value(cls, value: Any) -> KVLayout:
        """Accepts a KVLayout, a dict, or any object with the same attributes (extra fields ignored)."""
        if isinstance(value, cls):
            return value
        names = [f.name for f in fields(cls)]
        get = value.get if isinstance(value, dict) else lambda n: getattr(value, n, None)
        missing = [n for n in names if get(n) is None]
        if missing:
            raise LayoutError(f"fingerprint: missing field(s) {', '.join(missing)}")
        values: dict[str, Any] = {n: get(n) for n in names}
        values["dtype"] = str(values["dtype"]).removeprefix("torch.")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def difference(self, theirs: KVLayout) -> LayoutDifference | None:
        """The first field (in LAYOUT_FIELDS order) whose values differ, or None when compatible."""
        for name in LAYOUT_FIELDS:
            mine, other = getattr(self, name), getattr(theirs, name)
            if mine != other:
                return LayoutDifference(name, mine, other)
        return None

    def mismatch(self, theirs: KVLayout) -> str | None:
        """A readable reason naming the first differing field, or None when compatible."""
        diff = self.difference(theirs)
        if diff is None:
            return None
        return f"layout mismatch: {diff.field} is {diff.mine!r} here and {diff.theirs!r} on the peer"
