"""Every message two transfer engines exchange, and the one codec and frame format for them.

A control frame is `[u32 header length][u64 payload length][header: orjson][payload bytes]`.
Only the tcp data plane puts bytes in the payload; the others carry addresses or tags in the
header and move the bytes out of band. This module must never touch sockets or tensors.
"""

from __future__ import annotations

import struct
import types
import typing
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Union

import orjson

# 2: token proven by HMAC challenge-response, never sent (handshake.py); 3: the data plane is
# negotiated per connection (Hello.backends, HelloReply.backends, HelloProof.backend)
PROTOCOL_VERSION = 3
FRAME_PREFIX = struct.Struct("<IQ")  # header length, payload length
MAX_HEADER_BYTES = 64 * 1024 * 1024
MAX_HANDSHAKE_HEADER_BYTES = 64 * 1024  # before the handshake: a Hello is under 2 KiB
_INT_RANGE = range(-(2**63), 2**64)  # what a 64-bit field holds (tags are unsigned)


class MessageError(ValueError):
    """A frame could not be decoded; the connection that sent it is closed."""


@dataclass(frozen=True)
class Hello:
    """Receiver side -> sender side, first frame on a new control connection (handshake.py)."""

    kind: ClassVar[str] = "hello"
    version: int
    backends: list[str]  # the data planes this side offers, best first
    auth: bool  # this side holds a cluster token and will prove it
    nonce: str  # hex, fresh per connection
    host_id: str
    pid: int
    ucx_address: str | None = None  # "<tag nonce>:<UCX worker address>", hex (when ucx is offered)


@dataclass(frozen=True)
class HelloReply:
    """Sender side -> receiver side: accepted (with the sender's proof when auth, and the planes both
    sides can use for this connection, best first) or refused."""

    kind: ClassVar[str] = "hello_reply"
    ok: bool
    reason: str | None
    host_id: str
    pid: int
    nonce: str | None = None  # hex, fresh per connection (auth only)
    proof: str | None = None  # the sender's HMAC (auth only)
    ucx_address: str | None = None
    probe: list[int] | None = None  # cma: [address, length, checksum] of a buffer to read back
    backends: list[str] | None = None  # of the Hello's, those this side can use with that peer


@dataclass(frozen=True)
class HelloProof:
    """Receiver side -> sender side, last frame of the handshake: the plane the receiver chose (from
    HelloReply.backends) and its HMAC when auth; or no plane, and why it gave up."""

    kind: ClassVar[str] = "hello_proof"
    backend: str | None
    proof: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class RoomRequest:
    """Receiver -> sender: where the KV of `room` goes."""

    kind: ClassVar[str] = "room_request"
    room: int
    fingerprint: dict[str, Any]
    dst_page_ids: list[int]
    expected_tokens: int
    prompt_hash: str


@dataclass(frozen=True)
class RoomAccept:
    """Sender -> receiver: a sender exists for the room and knows the destination."""

    kind: ClassVar[str] = "room_accept"
    room: int


@dataclass(frozen=True)
class RoomAbort:
    """Either way: the room failed or was aborted on this side; the peer fails it too."""

    kind: ClassVar[str] = "room_abort"
    room: int
    reason: str


@dataclass(frozen=True)
class Data:
    """Sender -> receiver: KV of `layers` for the destination page runs `runs` ([start, count]).

    Byte order of the data: for each layer, K then V, for each run, the run's pages in order.
    `staged`: the sender gathered non-contiguous pages; the receiver may stage and scatter too.
    """

    kind: ClassVar[str] = "data"
    room: int
    seq: int
    layers: list[int]  # [first, end)
    runs: list[list[int]]
    nbytes: int
    staged: bool
    src_base: list[int] | None = None  # cma: address of each source pool, per layer K then V
    src_starts: list[int] | None = None  # cma: first source page of each run
    tag: int | None = None  # ucx: first tag; part i is sent with tag + i
    parts: int = 1  # ucx: number of tag messages


@dataclass(frozen=True)
class Finish:
    """Sender -> receiver, after every Data of the room: the first token and its logprobs."""

    kind: ClassVar[str] = "finish"
    room: int
    first_token: int
    first_token_logprobs: dict[str, Any] | list[Any] | float | None
    data_messages: int
    nbytes: int


@dataclass(frozen=True)
class FinishAck:
    """Receiver -> sender: every byte landed and the room succeeded; source pages may be freed."""

    kind: ClassVar[str] = "finish_ack"
    room: int


Message = Hello | HelloReply | HelloProof | RoomRequest | RoomAccept | RoomAbort | Data | Finish | FinishAck
_KINDS: dict[str, type[Any]] = {
    cls.kind: cls
    for cls in (Hello, HelloReply, HelloProof, RoomRequest, RoomAccept, RoomAbort, Data, Finish, FinishAck)
}


def encode(message: Message, payload_len: int = 0) -> bytes:
    """Header prefix and JSON for one frame; the payload (if any) is written after it."""
    body = orjson.dumps({"t": message.kind, **asdict(message)})
    return FRAME_PREFIX.pack(len(body), payload_len) + body


def decode(body: bytes) -> Message:
    """The message in a frame's header, every field of its declared type (MessageError if not):
    handlers never see a string where an int belongs, a float room id, or an int past 64 bits."""
    raw: Any = None
    try:
        raw = orjson.loads(body)
        cls = _KINDS[raw.pop("t")]
        message = cls(**raw)
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise _decode_error(raw, f"undecodable control frame: {exc}") from exc
    bad = next(
        (f.name for f in fields(message) if not _conforms(getattr(message, f.name), _TYPES[cls][f.name])),
        None,
    )
    if bad is not None:
        value = repr(getattr(message, bad))
        value = value if len(value) <= 80 else value[:77] + "..."
        hint = _TYPES[cls][bad]
        raise _decode_error(
            raw, f"{cls.kind}: field {bad} = {value} is not {getattr(hint, '__name__', hint)}"
        )
    return message  # type: ignore[no-any-return]


def _decode_error(raw: Any, detail: str) -> MessageError:
    version = raw.get("version", PROTOCOL_VERSION) if isinstance(raw, dict) else PROTOCOL_VERSION
    if version != PROTOCOL_VERSION:  # an older Hello has other fields: say why it fails
        return MessageError(
            f"peer speaks transfer protocol version {version!r}, this engine {PROTOCOL_VERSION}: "
            "run the same pd-serve version on every node"
        )
    return MessageError(detail)


def _conforms(value: Any, hint: Any) -> bool:
    """Whether a decoded JSON value has the declared type: int (not bool, 64-bit), float (or int),
    str, bool, None, list[X] (every item), dict (keys are JSON strings), Any, and unions of these."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_conforms(value, h) for h in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_conforms(v, item) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if hint is int:
        return type(value) is int and value in _INT_RANGE
    if hint is float:
        return type(value) in (int, float)
    if hint is type(None):
        return value is None
    return type(value) is hint


_TYPES: dict[type[Any], dict[str, Any]] = {cls: typing.get_type_hints(cls) for cls in _KINDS.values()}
