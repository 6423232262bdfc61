"""SGLang's router fields -> our `pd`: how a node driven by smg joins the same rooms as one driven by
our frontend.

smg adds `bootstrap_host` (the prefill URL's host), `bootstrap_port` (the port given after that URL,
or null) and `bootstrap_room` (random, 0..2^63-1) to the client's body, one value per prompt or choice
for batches, and sends the same body to the prefill and the decode node. Both map it here onto
`PDParams(room, prefill, decode, prefill_url)`:
- the room is the first `bootstrap_room`: choice i then uses room + i on both nodes (`choice_pd`),
  as with our frontend, so a list's other rooms are not needed;
- a decode node finds the prefill node's transfer endpoint at `http://bootstrap_host:bootstrap_port`
  (`sglang_bootstrap.PrefillDirectory`); a prefill node needs neither field;
- a colocated node serves the whole request and ignores them, as SGLang's own server does.
The cluster-token check of a body with any of these fields is `middleware.ClusterPlane`'s.
"""

from __future__ import annotations

from typing import TypeVar

from pd_serve.server.errors import bad_request
from pd_serve.server.schemas import PDParams, _GenerationRequest

R = TypeVar("R", bound=_GenerationRequest)
T = TypeVar("T")
_ROUTER = "sglang-router"  # PDParams.decode for rooms an SGLang router opened (only ever logged)
_HOW = (
    "give smg the prefill node's bootstrap port after its URL: --prefill http://HOST:PORT BOOTSTRAP_PORT "
    "(the prefill node's --bootstrap-port, else its HTTP port)"
)


def with_sglang_pd(req: R, role: str) -> R:
    """`req` with `pd` set from SGLang's router fields (unchanged without `bootstrap_room`)."""
    if req.bootstrap_room is None or role == "colocated":
        return req
    if req.pd is not None:
        raise bad_request(
            "bootstrap_room",
            "send either 'pd' (pd-serve's frontend) or SGLang's bootstrap_* fields (smg), not both",
        )
    room = _one("bootstrap_room", req.bootstrap_room)
    host = _one("bootstrap_host", req.bootstrap_host)
    port = _one("bootstrap_port", req.bootstrap_port)
    url = None
    if role == "decode":
        if not host:
            raise bad_request("bootstrap_host", "a decode node needs bootstrap_host, the prefill node's host")
        if not port:
            raise bad_request("bootstrap_port", f"a decode node needs bootstrap_port; {_HOW}")
        url = f"http://{_bracketed(host)}:{port}"
    pd = PDParams(room=room, prefill=url or f"{host}:{port}", decode=_ROUTER, prefill_url=url)
    return req.model_copy(update={"pd": pd})


def _one(name: str, value: T | list[T]) -> T:
    """The value of a scalar field, or of a list whose entries all agree (one prefill node per request)."""
    if not isinstance(value, list):
        return value
    if not value:
        raise bad_request(name, f"{name} is an empty list")
    if name != "bootstrap_room" and any(v != value[0] for v in value):
        raise bad_request(name, f"{name} differs between entries: one request goes to one prefill node")
    return value[0]


def _bracketed(host: str) -> str:
    text = host
    return f"[{text}]" if ":" in text and not text.startswith("[") else text
