"""KV transfer between a prefill and a decode engine: room-keyed page moves over cma, ucx or tcp.

The transfer layer knows tensors, page ids and rooms, never requests. One `TransferEngine` per
node owns the pools (per layer one K and one V tensor `[num_pages, page_size, num_kv_heads,
head_dim]`), a listening endpoint and its own thread with an asyncio loop; every network byte
moves there, in a `TransferLoop` (loop.py) that holds the room table, the handshake, the send path
and the receive path as members. All methods below are called from the engine's scheduler thread,
are cheap, and never block on the network. They raise ValueError/RuntimeError only for caller
mistakes.

Call order
----------
Both nodes, once::

    te = TransferEngine(TransferConfig(backend="auto"|"cma"|"ucx"|"tcp", host, port, timeouts, token),
                        pools=[(k_pool, v_pool) for each layer], fingerprint=kv_layout)
    te.start()                      # binds; raises if no backend can start
    te.endpoint                     # "auto://host:port": publish it in the bootstrap registry
    te.backends                     # the data planes it offers, best first, e.g. ["cma", "ucx", "tcp"]
    te.peers(), te.plane_stats()    # each open connection's plane; connections and rooms per plane
    ...
    te.close()                      # at shutdown

Decode node, per request (after allocating its pages)::

    rx = te.receiver(room, peer_endpoint=prefill_endpoint, dst_page_ids=[...],
                     expected_tokens=n_prompt_tokens, prompt_hash="...")
    rx.poll()      # BOOTSTRAPPING -> WAITING_FOR_INPUT (prefill accepted) -> TRANSFERRING -> SUCCESS
    rx.first_token, rx.first_token_logprobs   # set once poll() is SUCCESS
    rx.failure_reason                         # str once poll() is FAILED; free the pages then
    rx.abort(reason)                          # fails the room here and at the prefill node

Prefill node, per request::

    tx = te.sender(room)            # may come before or after the decode node's request
    tx.poll()                       # BOOTSTRAPPING until the request arrives, then WAITING_FOR_INPUT
    tx.destination()                # Destination(page_ids, expected_tokens, prompt_hash) or None
    tx.send(src_page_ids, layers=None, first_page=0)   # any number of times, e.g. per layer
    tx.finish(first_token, first_token_logprobs)       # once, after the last send()
    tx.poll()                       # TRANSFERRING -> SUCCESS once decode acknowledged every byte
    tx.failure_reason, tx.abort(reason)

`send(src, layers, first_page)` moves, for every layer in `layers` (a range or (first, end);
None: all) and for K and V, source pages `src` into destination pages
`destination().page_ids[first_page : first_page + len(src)]`. Runs contiguous on both sides move
as one region; when the average run is shorter than `min_run_bytes` the pages are gathered into
one staging buffer (one message). Source pages must stay allocated until the sender's poll() is
SUCCESS or FAILED; destination pages until the receiver's poll() is terminal (FAILED is reported
only once no write into them can happen any more).

Failure: every non-terminal state has a timeout (`bootstrap_timeout`, `waiting_timeout`,
`transfer_timeout`, the last restarted by progress); a lost connection fails all its rooms; in
a connection's handshake (within `connect_timeout`) both ends prove they hold the cluster token by
HMAC challenge-response over fresh nonces and the token never crosses the wire (`handshake.py`,
`auth.py`; no token on either end: no proofs; a token on one end only: refused); the layout
fingerprint is checked per room; a second request for a room is refused; messages for unknown or
finished rooms are dropped and counted (`te.stats()`).

Data planes: `tcp` (bytes on the control socket, any two hosts), `cma` (same host only: the
receiver pulls pages with process_vm_readv, one copy), `ucx` (UCX tag messages; settings and measured
numbers in `ucx_plane.py`). `TransferConfig.backend` forces one, or `auto` (the default) offers every
plane that starts here and each connection's handshake picks the best both ends can use: cma on one
host (if its probe read works), else ucx, else tcp (`handshake.py`). No plane polls: idle, the
transfer thread sleeps in epoll.
"""

from __future__ import annotations

from pd_serve.kv_layout import KVLayout
from pd_serve.transfer.config import (
    BACKENDS,
    RoomState,
    TransferConfig,
    TransferConfigError,
    default_backend,
)
from pd_serve.transfer.engine import TransferEngine
from pd_serve.transfer.handles import KVReceiver, KVSender
from pd_serve.transfer.room import Destination

__all__ = [
    "BACKENDS",
    "Destination",
    "KVReceiver",
    "KVSender",
    "KVLayout",
    "RoomState",
    "TransferConfig",
    "TransferConfigError",
    "TransferEngine",
    "default_backend",
]
