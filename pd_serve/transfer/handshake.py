"""The control connection's handshake (a mixin of `Node`): both ends prove they hold the cluster
token, and the token never crosses the wire.

The receiver side connects (the initiator) to the sender side (the acceptor):

    receiver -> sender  Hello(version, backend, auth, nonce_r, host_r, pid, plane fields)
    sender -> receiver  HelloReply(ok, reason, host_s, pid, nonce_s, proof_s, plane fields)
    receiver -> sender  HelloProof(proof_r)                                        (auth only)

    proof_x = HMAC-SHA256(key=token, json([label_x, version, backend, nonce_r, nonce_s, host_r, host_s]))

One label per direction, so that a proof cannot be reflected back; 32 fresh random bytes of nonce
from each side, so that a proof is good for one connection only. The receiver checks the sender's
proof before it runs its plane hook (cma probe read, ucx endpoint) or shows its own; the sender
takes no room message before the receiver's proof (`conn.hello` stays None until the handshake is
complete on that side). The third message costs no round trip: the receiver's first RoomRequest
follows it at once. Without a token on either end (`auth` False) there are no proofs and no third
message; a token on one end only is refused. This module must never send or log the token,
an expected proof, or any function of the token alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import secrets
from collections import Counter
from typing import Any, NoReturn

import orjson

from pd_serve.transfer.config import TransferConfig
from pd_serve.transfer.connection import Connection, ConnectionClosed
from pd_serve.transfer.messages import PROTOCOL_VERSION, Hello, HelloProof, HelloReply, MessageError
from pd_serve.transfer.plane import DataPlane

log = logging.getLogger(__name__)

NONCE_BYTES = 32
_LABELS = {"sender": "pd-serve transfer: sender proof", "receiver": "pd-serve transfer: receiver proof"}
REASON_CHARS = 300  # a refusal quoting a peer's fields is cut to this in logs and answers
TOKEN_HINT = "set the same --cluster-token-file or PD_SERVE_CLUSTER_TOKEN on every node"


def new_nonce() -> str:
    return secrets.token_bytes(NONCE_BYTES).hex()


def valid_nonce(nonce: object) -> bool:
    return isinstance(nonce, str) and 32 <= len(nonce) <= 256  # 16 to 128 random bytes, hex


def proof(token: str, prover: str, hello: Hello, sender_nonce: str, sender_host: str) -> str:
    """The MAC `prover` ("sender" or "receiver") shows on the connection that `hello` opened."""
    fields = [
        _LABELS[prover],
        hello.version,
        hello.backend,
        hello.nonce,
        sender_nonce,
        hello.host_id,
        sender_host,
    ]
    return hmac.new(token.encode(), orjson.dumps(fields), hashlib.sha256).hexdigest()


def proof_matches(
    token: str, prover: str, hello: Hello, sender_nonce: Any, sender_host: str, got: Any
) -> bool:
    if not (isinstance(got, str) and valid_nonce(sender_nonce)):
        return False
    return hmac.compare_digest(proof(token, prover, hello, sender_nonce, sender_host).encode(), got.encode())


def token_mismatch(prover: str) -> str:
    return f"authentication failed: the {prover} could not prove the cluster token (the cluster token does not match; {TOKEN_HINT})"


def token_setting_refusal(sender_has: bool, receiver_has: bool) -> str | None:
    if sender_has == receiver_has:
        return None
    s, r = ("a cluster token" if has else "none" for has in (sender_has, receiver_has))
    return (
        "authentication failed: the cluster token does not match: the token setting differs "
        f"(the sender side has {s}, the receiver side has {r}; {TOKEN_HINT})"
    )


class Handshake:
    config: TransferConfig
    plane: DataPlane
    stats: Counter[str]
    host_id: str

    def greeting(self, conn: Connection) -> Hello:
        """The first frame of an outbound connection, kept on it to check the reply against."""
        hello = Hello(
            PROTOCOL_VERSION,
            self.plane.name,
            self.config.token is not None,
            new_nonce(),
            self.host_id,
            os.getpid(),
            **self.plane.hello_fields(conn),
        )
        conn.handshake = hello
        return hello

    def handshake_deadline(self, conn: Connection) -> None:
        """Called connect_timeout after accepting `conn`: a peer that has not completed is cut."""
        if conn.hello is None:
            conn.close(f"no complete handshake within {self.config.connect_timeout} s (connect_timeout)")

    async def on_handshake(self, conn: Connection, msg: Hello | HelloReply | HelloProof) -> None:
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
        if reason is None:
            reason = await self.plane.on_hello(conn, msg)
        if reason is not None:
            await self._refuse(conn, reason)
        fields = self.plane.hello_fields(conn)
        token = self.config.token
        if token is None:
            await conn.send(HelloReply(True, None, self.host_id, os.getpid(), **fields))
            self._complete(conn, msg)
            return
        nonce = new_nonce()
        conn.handshake = (msg, nonce)
        mine = proof(token, "sender", msg, nonce, self.host_id)
        await conn.send(HelloReply(True, None, self.host_id, os.getpid(), nonce, mine, **fields))

    def _hello_refusal(self, msg: Hello) -> str | None:
        if msg.version != PROTOCOL_VERSION:
            return f"protocol version {msg.version} is not {PROTOCOL_VERSION}"
        if msg.backend != self.plane.name:
            return f"backend {str(msg.backend)[:40]!r} differs from this engine's {self.plane.name!r}"
        if not isinstance(msg.host_id, str) or not valid_nonce(msg.nonce):
            return "malformed hello: host_id or nonce"
        return token_setting_refusal(self.config.token is not None, bool(msg.auth))

    async def _on_proof(self, conn: Connection, msg: HelloProof) -> None:
        hello, nonce = conn.handshake
        if msg.proof is None:
            reason = f"the receiver gave up the handshake: {str(msg.reason)[:300]!r}"
            log.warning(
                "transfer control connection from %s closed during the handshake: %s", conn.peer, reason
            )
            raise ConnectionClosed(reason)
        assert self.config.token is not None  # a pending handshake exists only with a token
        if not proof_matches(self.config.token, "receiver", hello, nonce, self.host_id, msg.proof):
            await self._refuse(conn, token_mismatch("receiver"))
        self._complete(conn, hello)

    # ---- receiver side (initiator) -------------------------------------------------------------

    async def _on_reply(self, conn: Connection, msg: HelloReply) -> None:
        hello: Hello = conn.handshake
        reason = self._reply_refusal(hello, msg)
        if reason is None:
            reason = await self.plane.on_hello(conn, msg)
        if reason is not None:
            await self._refuse(conn, reason)
        if self.config.token is not None:
            await conn.send(
                HelloProof(proof(self.config.token, "receiver", hello, msg.nonce or "", msg.host_id))
            )
        self._complete(conn, msg)

    def _reply_refusal(self, hello: Hello, msg: HelloReply) -> str | None:
        token = self.config.token
        if token is None:
            return token_setting_refusal(msg.proof is not None, False)
        if not proof_matches(token, "sender", hello, msg.nonce, str(msg.host_id), msg.proof):
            return token_mismatch("sender")
        return None

    # ---- both ----------------------------------------------------------------------------------

    def _complete(self, conn: Connection, peer_hello: Hello | HelloReply) -> None:
        conn.hello, conn.handshake = peer_hello, None
        conn.ready.set_result(True)

    async def _refuse(self, conn: Connection, reason: str) -> NoReturn:
        """Count, log once, tell the peer why (when it waits for an answer), close."""
        if len(reason) > REASON_CHARS:  # may quote what an unauthenticated peer sent
            reason = reason[:REASON_CHARS] + "..."
        self.stats["refused_connections"] += 1
        side = f"to {conn.peer}" if conn.outbound else f"from {conn.peer}"
        log.warning("transfer control connection %s refused: %s", side, reason)
        answer: HelloReply | HelloProof | None = HelloReply(False, reason, self.host_id, os.getpid())
        if conn.outbound:  # the sender waits for a third message only when both sides hold a token
            answer = (
                HelloProof(None, reason)
                if isinstance(conn.handshake, Hello) and conn.handshake.auth
                else None
            )
        if answer is not None:
            with contextlib.suppress(OSError, ConnectionClosed):
                await conn.send(answer)
        raise ConnectionClosed(reason if conn.outbound else f"refused {conn.peer}: {reason}")
