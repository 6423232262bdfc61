"""A prefill-side transfer peer for the transfer tests, run as its own process.

Usage: python transfer_peer.py BACKEND DTYPE SEED TOKEN|- [TIMEOUT_S]. It prints its endpoint as the
first stdout line, then reads JSON commands on stdin and answers each with one JSON line:
  {"op": "expect", "room": R, "src": [...], "action": "send"|"split"|"partial"|"abort"|"hold"}
  {"op": "receive", "room": R, "endpoint": E, "dst": [...], "tokens": T}  (act as decode instead)
  {"op": "status", "rooms": [R, ...]}  ->  {"R": [state, reason], ...}
  {"op": "stats"}  ->  {"stats": engine.stats(), "rss_kb", "hwm_kb", "fds", "threads"} (the fuzz tests)
Pools are random from SEED, so the test rebuilds the same bytes with `make_pools`.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import torch

from pd_serve.transfer import RoomState, TransferConfig, TransferEngine

NUM_LAYERS, NUM_PAGES, PAGE_SIZE, HEADS, HEAD_DIM = 3, 96, 4, 2, 16
TIMEOUT_S = 2.5


def fingerprint(dtype: str, config_hash: str = "cfg-1") -> dict[str, object]:
    return dict(
        architecture="llama",
        num_layers=NUM_LAYERS,
        num_kv_heads=HEADS,
        head_dim=HEAD_DIM,
        dtype=dtype,
        page_size=PAGE_SIZE,
        config_hash=config_hash,
    )


def make_pools(dtype: str, seed: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = (NUM_PAGES, PAGE_SIZE, HEADS, HEAD_DIM)
    gen = torch.Generator().manual_seed(seed or 0)

    def one() -> torch.Tensor:
        if seed is None:
            return torch.zeros(shape, dtype=getattr(torch, dtype))
        return torch.randn(shape, generator=gen).to(getattr(torch, dtype))

    return [(one(), one()) for _ in range(NUM_LAYERS)]


def config(backend: str, token: str | None, timeout: float = TIMEOUT_S) -> TransferConfig:
    return TransferConfig(
        backend=backend,
        bootstrap_timeout=timeout,
        queue_timeout=timeout,
        waiting_timeout=timeout,
        transfer_timeout=timeout,
        connect_timeout=timeout,
        token=token,
        min_run_bytes=1024,
    )


def act(tx, src: list[int], action: str, room: int) -> None:  # type: ignore[no-untyped-def]
    if action == "abort":
        tx.abort("prefill aborted the room")
    elif action == "send":
        tx.send(src)
        tx.finish(room % 50000, {"logprob": -0.25, "room": room})
    elif action in ("split", "partial"):
        tx.send(src, layers=(0, 1))
        if action == "split":
            tx.send(src, layers=range(1, NUM_LAYERS))
            tx.finish(room % 50000, [-0.5])


def process_facts() -> dict[str, int]:
    """Memory (current and peak resident, kB), open file descriptors and threads of this process.
    Retried for a while when no descriptor is free (a test may be flooding the transfer port)."""
    for _ in range(100):
        try:
            with open("/proc/self/status") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
            fds = len(os.listdir("/proc/self/fd"))
            break
        except OSError:
            time.sleep(0.05)
    else:
        raise RuntimeError("no file descriptor became free within 5 s")
    return {
        "rss_kb": int(status["VmRSS"].split()[0]),
        "hwm_kb": int(status["VmHWM"].split()[0]),
        "fds": fds,
        "threads": threading.active_count(),
    }


def main() -> None:
    backend, dtype, seed, token = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    timeout = float(sys.argv[5]) if len(sys.argv) > 5 else TIMEOUT_S
    engine = TransferEngine(
        config(backend, None if token == "-" else token, timeout), make_pools(dtype, seed), fingerprint(dtype)
    ).start()
    print(engine.endpoint, flush=True)
    senders: dict[int, object] = {}
    todo: dict[int, tuple[list[int], str]] = {}
    lock = threading.Lock()

    def drive() -> None:
        while True:
            with lock:
                for room, (src, action) in list(todo.items()):
                    tx = senders[room]
                    if tx.poll() is RoomState.FAILED or tx.destination() is not None:  # type: ignore[attr-defined]
                        del todo[room]
                        if tx.poll() is not RoomState.FAILED:  # type: ignore[attr-defined]
                            act(tx, src, action, room)
            time.sleep(0.005)

    threading.Thread(target=drive, daemon=True).start()
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "expect":
            with lock:
                senders[cmd["room"]] = engine.sender(cmd["room"])
                todo[cmd["room"]] = (cmd["src"], cmd["action"])
            reply: object = {"ok": True}
        elif cmd["op"] == "receive":
            senders[cmd["room"]] = engine.receiver(
                cmd["room"], cmd["endpoint"], cmd["dst"], cmd["tokens"], "h"
            )
            reply = {"ok": True}
        elif cmd["op"] == "stats":
            reply = {"stats": engine.stats(), **process_facts()}
        else:
            reply = {str(r): [senders[r].poll().name, senders[r].failure_reason] for r in cmd["rooms"]}  # type: ignore[attr-defined]
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
