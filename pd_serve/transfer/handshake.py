"""The control connection's handshake (a member of `TransferLoop`): both ends prove they hold the
cluster token, the token never crosses the wire, and they agree on the data plane of the connection.

The receiver side connects (the initiator) to the sender side (the acceptor):

    receiver -> sender  Hello(version, offer_r, auth, nonce_r, host_r, pid, plane fields)
    sender -> receiver  HelloReply(ok, reason, host_s, pid, nonce_s, proof_s, plane fields, offer_s)
    receiver -> sender  HelloProof(choice, proof_r)         (choice None: gave up, with a reason)

    offer_r  the planes the receiver runs, best first (`auto`: cma, ucx, tcp; forced: one)
    offer_s  those of offer_r the sender runs and may use with this peer: cma only with the same
             host id (hostname and boot id), ucx only with a well-formed worker address
    choice   the first of offer_s whose set-up works on the receiver, the side that reads: cma's
             probe read of a buffer of the sender's (ptrace permission), ucx's endpoint
    proof_x = HMAC-SHA256(key=token, json([label_x, version, offer_r, offer_s, choice_x, nonce_r,
              nonce_s, host_r, host_s]))   with choice_s = "" (the sender proves before the choice)

One label per direction, so that a proof cannot be reflected back; 32 fresh random bytes of nonce
from each side, so that a proof is good for one connection only; both offers and the choice inside
the proofs (auth.py), so that nobody between the two can steer the choice. The receiver checks the
sender's proof before it runs any plane set-up or shows its own; the sender takes no room message
before the third frame (`conn.hello` stays None until the handshake is complete on that side), and
sets its plane up only then. The third frame costs no round trip: the receiver's first RoomRequest
follows it at once. Without a token on either end (`auth` False) there are no nonce_s and no
proofs; a token on one end only is refused. This module must never send or log the token, an
expected proof, or any function of the token alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections import Counter
from collections.abc import Callable
from typing import Any, NoReturn

from pd_serve.transfer.auth import (
    new_nonce,
    proof,
    proof_matches,
    token_mismatch,
    token_setting_refusal,
    valid_nonce,
)
from pd_serve.transfer.config import TransferConfig
from pd_serve.transfer.connection import Connection, ConnectionClosed
from pd_serve.transfer.messages import PROTOCOL_VERSION, Hello, HelloProof, HelloReply, MessageError
from pd_serve.transfer.plane import DataPlane

log = logging.getLogger(__name__)

REASON_CHARS = 300  # a refusal quoting a peer's fields is cut to this in logs and answers


def host_id() -> str:
    """This host as the handshake names it (hostname and boot id): cma needs the same one."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "unknown"
    return f"{socket.gethostname()}/{boot}"


def quoted(names: list[str]) -> str:
    """A peer's list of backend names, cut for a log line or a refusal."""
    shown = ", ".join(repr(str(n)[:20]) for n in names[:5])
    return f"[{shown}{', ...' if len(names) > 5 else ''}]"


class Handshake:
    """The handshake of every control connection of one loop. Calls, per connection:
    `greeting(conn)` (one this side opens) or `deadline(conn)` (connect_timeout after accepting
    one), then `on_message` for each handshake frame; once complete, `conn.plane` is chosen and
    `on_connected(conn, notes)` is called (`notes`: why the planes tried first did not work)."""

    def __init__(
        self,
        config: TransferConfig,
        planes: dict[str, DataPlane],
        stats: Counter[str],
        on_connected: Callable[[Connection, list[str]], None],
    ) -> None:
        self.config = config
        self.planes = planes  # the planes this engine offers, best first
        self.stats = stats
        self.on_connected = on_connected
        self.host_id = host_id()

    def greeting(self, conn: Connection) -> Hello:
        """The first frame of an outbound connection, kept on it to check the reply against."""
        fields: dict[str, Any] = {}
        for plane in self.planes.values():
            fields.update(plane.hello_fields(conn, None))
        hello = Hello(
            PROTOCOL_VERSION,
            list(self.planes),
            self.config.token is not None,
            new_nonce(),
            self.host_id,
            os.getpid(),
            **fields,
        )
        conn.handshake = hello
        return hello

    def deadline(self, conn: Connection) -> None:
        """Called connect_timeout after accepting `conn`: a peer that has not completed is cut."""
        if conn.hello is None:
            conn.close(f"no complete handshake within {self.config.connect_timeout} s (connect_timeout)")

    async def on_message(self, conn: Connection, msg: Hello | HelloReply | HelloProof) -> None:
        if isinstance(msg, HelloReply) and not msg.ok and conn.outbound:
            raise ConnectionClosed(f"peer refused the connection: {str(msg.reason)[:500]}")
        expected = HelloReply if conn.outbound else HelloProof if conn.handshake is not None else Hello
        if conn.hello is not None or not isinstance(msg, expected):
            raise MessageError(f"unexpected {msg.kind} from {conn.peer} in the handshake")
        if isinstance(msg, Hello):
            await self._on_hello(conn, msg)
        elif isinstance(msg, HelloProof):
            await self._on_proof(conn, msg)
        else:
            await self._on_reply(conn, msg)

    # ---- sender side (acceptor) ----------------------------------------------------------------

    async def _on_hello(self, conn: Connection, msg: Hello) -> None:
        reason = self._hello_refusal(msg)
        offer: list[str] = []
        if reason is None:
            offer, dropped = self._offer(msg)
            if not offer:
                reason = self._nothing_in_common(msg, dropped)
        if reason is not None:
            await self._refuse(conn, reason)
        fields: dict[str, Any] = {}
        for name in offer:
            fields.update(self.planes[name].hello_fields(conn, msg))
        token = self.config.token
        nonce = new_nonce() if token is not None else None
        conn.handshake = (msg, nonce, offer)
        mine = None if token is None else proof(token, "sender", msg, nonce or "", self.host_id, offer, "")
        reply = HelloReply(True, None, self.host_id, os.getpid(), nonce, mine, backends=offer, **fields)
        await conn.send(reply)

    def _hello_refusal(self, msg: Hello) -> str | None:
        if msg.version != PROTOCOL_VERSION:
            return f"protocol version {msg.version} is not {PROTOCOL_VERSION}"
        if not valid_nonce(msg.nonce):
            return "malformed hello: nonce"
        return token_setting_refusal(self.config.token is not None, bool(msg.auth))

    def _offer(self, msg: Hello) -> tuple[list[str], list[str]]:
        """Our planes that the peer offers and that may serve it, best first; why the others may not."""
        offer, dropped = [], []
        for name, plane in self.planes.items():
            if name in msg.backends:
                why = plane.refusal(msg)
                offer += [name] if why is None else []
                dropped += [] if why is None else [f"{name}: {why}"]
        return offer, dropped

    def _nothing_in_common(self, msg: Hello, dropped: list[str]) -> str:
        mine = ", ".join(self.planes)
        reason = (
            f"no transfer backend in common: the peer offers {quoted(msg.backends)}, this engine "
            f"[{mine}] (--transfer-backend {self.config.backend})"
        )
        return reason + "".join(f"; {d}" for d in dropped)

    async def _on_proof(self, conn: Connection, msg: HelloProof) -> None:
        hello, nonce, offer = conn.handshake
        if msg.backend is None:
            reason = f"the receiver gave up the handshake: {str(msg.reason)[:300]!r}"
            log.warning(
                "transfer control connection from %s closed during the handshake: %s", conn.peer, reason
            )
            raise ConnectionClosed(reason)
        token = self.config.token
        if token is not None and not proof_matches(
            token, "receiver", hello, nonce, self.host_id, offer, msg.backend, msg.proof
        ):
            await self._refuse(conn, token_mismatch("receiver"))
        if msg.backend not in offer:
            await self._refuse(conn, f"the receiver chose backend {msg.backend[:20]!r}, not one of {offer}")
        plane = self.planes[msg.backend]
        failure = await plane.on_hello(conn, hello)
        if failure is not None:
            await self._refuse(conn, failure)
        self._complete(conn, hello, plane, [])

    # ---- receiver side (initiator) -------------------------------------------------------------

    async def _on_reply(self, conn: Connection, msg: HelloReply) -> None:
        hello: Hello = conn.handshake
        reason = self._reply_refusal(hello, msg)
        plane: DataPlane | None = None
        notes: list[str] = []
        if reason is None:
            plane, notes = await self._choose(conn, msg)
            if plane is None:
                reason = "no transfer backend works with this peer: " + "; ".join(notes)
        if reason is not None or plane is None:
            await self._refuse(conn, reason or "no transfer backend")
        token, offer, choice = self.config.token, msg.backends or [], plane.name
        mine = None
        if token is not None:
            mine = proof(token, "receiver", hello, msg.nonce or "", msg.host_id, offer, choice)
        await conn.send(HelloProof(choice, mine))
        self._complete(conn, msg, plane, notes)

    def _reply_refusal(self, hello: Hello, msg: HelloReply) -> str | None:
        token = self.config.token
        if token is None:
            return token_setting_refusal(msg.proof is not None, False)
        offer = msg.backends or []
        if not proof_matches(token, "sender", hello, msg.nonce, str(msg.host_id), offer, "", msg.proof):
            return token_mismatch("sender")
        return None

    async def _choose(self, conn: Connection, msg: HelloReply) -> tuple[DataPlane | None, list[str]]:
        """The first plane of the reply's offer that sets up here; why each one before it did not."""
        offer = msg.backends or []
        if not offer or any(name not in self.planes for name in offer):
            return None, [f"the peer answered backends {quoted(offer)} to our [{', '.join(self.planes)}]"]
        notes: list[str] = []
        for name in offer:
            plane = self.planes[name]
            why = plane.refusal(msg) or await plane.on_hello(conn, msg)
            if why is None:
                return plane, notes
            plane.close_connection(conn)
            notes.append(f"{name}: {why}")
        return None, notes

    # ---- both ----------------------------------------------------------------------------------

    def _complete(
        self, conn: Connection, peer_hello: Hello | HelloReply, plane: DataPlane, notes: list[str]
    ) -> None:
        conn.hello, conn.handshake, conn.plane = peer_hello, None, plane
        conn.ready.set_result(True)
        self.on_connected(conn, notes)

    async def _refuse(self, conn: Connection, reason: str) -> NoReturn:
        """Count, log once, tell the peer why (when it waits for an answer), close."""
        if len(reason) > REASON_CHARS:  # may quote what an unauthenticated peer sent
            reason = reason[:REASON_CHARS] + "..."
        self.stats["refused_connections"] += 1
        side = f"to {conn.peer}" if conn.outbound else f"from {conn.peer}"
        log.warning("transfer control connection %s refused: %s", side, reason)
        answer: HelloReply | HelloProof = HelloReply(False, reason, self.host_id, os.getpid())
        if conn.outbound:  # the sender waits for the third frame: the choice, here none
            answer = HelloProof(None, None, reason)
        with contextlib.suppress(OSError, ConnectionClosed):
            await conn.send(answer)
        raise ConnectionClosed(reason if conn.outbound else f"refused {conn.peer}: {reason}")
