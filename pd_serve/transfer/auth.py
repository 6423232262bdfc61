"""The cluster token's proofs for the transfer handshake: HMAC-SHA256 over fresh nonces, both
offers and the choice, one label per direction (the protocol is in handshake.py).

What a proof covers, how it is checked (in constant time) and the refusals that name the token
setting. This module must never send or log the token, an expected proof, or any function of the
token alone.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any

import orjson

from pd_serve.transfer.messages import Hello

NONCE_BYTES = 32
_LABELS = {"sender": "pd-serve transfer: sender proof", "receiver": "pd-serve transfer: receiver proof"}
TOKEN_HINT = "set the same --cluster-token-file or PD_SERVE_CLUSTER_TOKEN on every node"


def new_nonce() -> str:
    return secrets.token_bytes(NONCE_BYTES).hex()


def valid_nonce(nonce: object) -> bool:
    return isinstance(nonce, str) and 32 <= len(nonce) <= 256  # 16 to 128 random bytes, hex


def proof(
    token: str, prover: str, hello: Hello, sender_nonce: str, sender_host: str, offer: list[str], choice: str
) -> str:
    """The MAC `prover` ("sender" or "receiver") shows on the connection that `hello` opened;
    `offer`: the reply's backends; `choice`: the receiver's (the sender proves with "")."""
    fields = [
        _LABELS[prover],
        hello.version,
        hello.backends,
        offer,
        choice,
        hello.nonce,
        sender_nonce,
        hello.host_id,
        sender_host,
    ]
    return hmac.new(token.encode(), orjson.dumps(fields), hashlib.sha256).hexdigest()


def proof_matches(
    token: str,
    prover: str,
    hello: Hello,
    sender_nonce: Any,
    sender_host: str,
    offer: list[str],
    choice: str,
    got: Any,
) -> bool:
    if not (isinstance(got, str) and valid_nonce(sender_nonce)):
        return False
    expected = proof(token, prover, hello, sender_nonce, sender_host, offer, choice)
    return hmac.compare_digest(expected.encode(), got.encode())


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
