"""Benchmark the KV transfer backends between two processes on this host, against host memcpy.

The parent process is the decode side (receiver); a spawned child is the prefill side (sender).
Layout: LAYERS layers, K and V, pages of 16 tokens x 8 KV heads x 128 dims, bfloat16 (32 KiB per
page per pool). Per backend it measures, room by room (handshake included): a contiguous room of
`--pages` pages (default 128 pages = 256 MiB), the same room with scattered page ids (gathered
into one staging message), and the latency of a 1-page and a 256-page room. memcpy (libc, via
ctypes.memmove) and torch copy_ of the same volume run in the same process, interleaved, because
this 2-core VM is shared and noisy. Prints JSON; --out also writes it to a file.

    python bench/bench_transfer.py [--backends tcp,cma,ucx,ucx-noeh] [--reps 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing as mp
import random
import statistics
import time
from typing import Any

import torch

from pd_serve.transfer import RoomState, TransferConfig, TransferEngine

LAYERS, PAGE, HEADS, DIM = 32, 16, 8, 128
POOL_PAGES = 264
FP = dict(
    architecture="llama",
    num_layers=LAYERS,
    num_kv_heads=HEADS,
    head_dim=DIM,
    dtype="bfloat16",
    page_size=PAGE,
    config_hash="bench",
)
PAGE_BYTES = PAGE * HEADS * DIM * 2
TIMEOUT_S = 60.0


def make_config(backend: str) -> TransferConfig:
    name, eh = (backend[:-5], False) if backend.endswith("-noeh") else (backend, True)
    return TransferConfig(
        backend=name,
        ucx_error_handling=eh,
        bootstrap_timeout=TIMEOUT_S,
        waiting_timeout=TIMEOUT_S,
        transfer_timeout=TIMEOUT_S,
    )


def make_pools(fill: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = (POOL_PAGES, PAGE, HEADS, DIM)
    return [
        (
            torch.full(shape, fill + i, dtype=torch.bfloat16),
            torch.full(shape, -fill - i, dtype=torch.bfloat16),
        )
        for i in range(LAYERS)
    ]


def _wait(handle: Any, timeout: float = TIMEOUT_S) -> RoomState:
    deadline = time.monotonic() + timeout
    while handle.poll() not in (RoomState.SUCCESS, RoomState.FAILED) and time.monotonic() < deadline:
        time.sleep(0.0002)
    return handle.poll()


def prefill_child(backend: str, conn: Any) -> None:
    torch.set_num_threads(1)
    engine = TransferEngine(make_config(backend), make_pools(1.0), FP).start()
    conn.send(engine.endpoint)
    while (cmd := conn.recv()) is not None:
        room, src = cmd
        tx = engine.sender(room)
        deadline = time.monotonic() + TIMEOUT_S
        while tx.destination() is None and tx.poll() is not RoomState.FAILED and time.monotonic() < deadline:
            time.sleep(0.0002)
        if tx.poll() is not RoomState.FAILED:
            tx.send(src)
            tx.finish(1, None)
        conn.send(_wait(tx).name)
    engine.close()


def run_room(engine: TransferEngine, conn: Any, endpoint: str, src: list[int], dst: list[int]) -> float:
    room = random.getrandbits(63)
    conn.send((room, src))
    start = time.perf_counter()
    rx = engine.receiver(room, endpoint, dst, len(dst) * PAGE, "bench")
    state = _wait(rx)
    elapsed = time.perf_counter() - start
    peer_state = conn.recv()
    if state is not RoomState.SUCCESS:
        raise RuntimeError(f"room failed: {rx.failure_reason} (sender: {peer_state})")
    return elapsed


class Memcpy:
    """Host memcpy of the room's volume: libc memcpy (ctypes.memmove) and torch copy_, best of 3."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.a, self.b = torch.ones(nbytes, dtype=torch.uint8), torch.zeros(nbytes, dtype=torch.uint8)

    def _best(self, fn: Any) -> float:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return self.nbytes / min(times) / 1e9

    def measure(self) -> tuple[float, float]:
        libc = self._best(lambda: ctypes.memmove(self.b.data_ptr(), self.a.data_ptr(), self.nbytes))
        return libc, self._best(lambda: self.b.copy_(self.a))


def bench_backend(backend: str, pages: int, reps: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=prefill_child, args=(backend, child), daemon=True)
    proc.start()
    try:
        endpoint = parent.recv() if parent.poll(120) else None
        if endpoint is None:
            raise RuntimeError(f"{backend}: prefill process did not start")
        with TransferEngine(make_config(backend), make_pools(0.0), FP) as engine:
            return measure(engine, parent, endpoint, pages, reps)
    finally:
        parent.send(None)
        proc.join(20)
        if proc.is_alive():
            proc.kill()


def measure(engine: TransferEngine, conn: Any, endpoint: str, pages: int, reps: int) -> dict[str, Any]:
    nbytes = pages * PAGE_BYTES * 2 * LAYERS
    contiguous = list(range(pages))
    scattered = random.Random(0).sample(range(POOL_PAGES), pages)
    run_room(engine, conn, endpoint, contiguous, contiguous)  # warm-up: connection, first touch
    memcpy = Memcpy(nbytes)
    rows: dict[str, list[float]] = {
        "GBps": [],
        "scattered_GBps": [],
        "memcpy_GBps": [],
        "torch_copy_GBps": [],
    }
    for _ in range(reps):
        rows["GBps"].append(nbytes / run_room(engine, conn, endpoint, contiguous, contiguous) / 1e9)
        libc, torch_copy = memcpy.measure()
        rows["memcpy_GBps"].append(libc)
        rows["torch_copy_GBps"].append(torch_copy)
        rows["scattered_GBps"].append(
            nbytes / run_room(engine, conn, endpoint, scattered, scattered[::-1]) / 1e9
        )
    lat1 = [run_room(engine, conn, endpoint, [7], [9]) * 1e3 for _ in range(max(reps, 5))]
    lat256 = [run_room(engine, conn, endpoint, list(range(256)), list(range(256))) * 1e3 for _ in range(2)]
    out: dict[str, Any] = {k: round(statistics.median(v), 3) for k, v in rows.items()}
    out["GBps_best"] = round(max(rows["GBps"]), 3)
    out["ratio_to_memcpy"] = round(out["GBps"] / out["memcpy_GBps"], 3)  # median / median
    out["ratio_best"] = round(max(rows["GBps"]) / max(rows["memcpy_GBps"]), 3)
    out["ratio_per_rep"] = [round(g / m, 3) for g, m in zip(rows["GBps"], rows["memcpy_GBps"])]
    out["latency_1page_ms"] = round(statistics.median(lat1), 3)
    out["latency_256page_ms"] = round(statistics.median(lat256), 3)
    out["room_MiB"] = nbytes / 2**20
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="tcp,cma,ucx,ucx-noeh")
    parser.add_argument("--pages", type=int, default=128, help="pages per throughput room (128 = 256 MiB)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {b: bench_backend(b, args.pages, args.reps) for b in args.backends.split(",")}
    best = max(results, key=lambda b: results[b]["ratio_to_memcpy"])
    report = {
        "layout": FP,
        "backends": results,
        "best_backend": best,
        "best_ratio_to_memcpy": results[best]["ratio_to_memcpy"],
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
