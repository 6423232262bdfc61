"""The machine share of one engine: the bytes of its KV pools (`--kv-cache-memory`, a size or a share
of free memory) and the CPUs it computes on (`--cpus`).

The flag takes a size (`4GiB`, `512MiB`, `2G`, `268435456`: bytes) or a fraction in (0, 1] of the
device memory still free once the weights are loaded (`0.5`); `auto` (the default) is a fraction
that suits the device: `AUTO_FRACTION["cuda"]` of what the GPU has free (vLLM's
`gpu_memory_utilization` plays the same part), `AUTO_FRACTION["cpu"]` of the host's available
memory (the host is shared with the other processes of a node and, under `pd-serve up`, with the
other nodes; on CPU the pools are mapped lazily, so memory is only used as pages fill). A budget
that does not fit the free memory is refused at start with the numbers. Standard library only at
import: `pd_serve.config` validates the flag with `parse_memory`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

AUTO_FRACTION = {"cpu": 0.25, "cuda": 0.85}
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


@dataclass(frozen=True)
class MemorySpec:
    """What `--kv-cache-memory` asked for: a size in bytes, or a fraction of free memory (auto: None)."""

    nbytes: int | None = None
    fraction: float | None = None

    def __str__(self) -> str:
        if self.nbytes is not None:
            return human_bytes(self.nbytes)
        return "auto" if self.fraction is None else f"{self.fraction:g} of free memory"


def parse_memory(value: str | int | float) -> MemorySpec:
    """`auto`, a size (`4GiB`, `300MB`, bytes as an integer) or a fraction in (0, 1]; ValueError names the
    problem."""
    text = str(value).strip()
    if text.lower() == "auto":
        return MemorySpec()
    match = _SIZE.match(text)
    if match is None or match.group(2).lower() not in _UNITS:
        raise ValueError(f"{text!r} is not a size (4GiB, 512MiB, bytes), a fraction in (0, 1] (0.5) or auto")
    number, unit = float(match.group(1)), match.group(2).lower()
    if not unit and number <= 1:
        if number <= 0:
            raise ValueError(f"{text!r}: a fraction of free memory must be above 0")
        return MemorySpec(fraction=number)
    if not unit and "." in text:
        raise ValueError(f"{text!r}: a fraction must be at most 1; give a size in bytes as an integer or with a unit")
    nbytes = int(number * _UNITS[unit])
    if nbytes < 1:
        raise ValueError(f"{text!r} is less than one byte")
    return MemorySpec(nbytes=nbytes)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def free_memory(device: str) -> int:
    """Bytes still free for this process's pools: the GPU's free memory, or the host's available memory
    (the smaller of /proc/meminfo's MemAvailable and what the cgroup's limit leaves)."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    available = _meminfo_available()
    left = _cgroup_left()
    return min(available, left) if left is not None else available


def kv_budget(spec: MemorySpec, device: str) -> tuple[int, str]:
    """The pools' bytes and how they were chosen (for the start log). Raises ValueError when a size does
    not fit the free memory."""
    free = free_memory(device)
    kind = "cuda" if device.startswith("cuda") else "cpu"
    if spec.nbytes is not None:
        if spec.nbytes > free:
            raise ValueError(
                f"{human_bytes(spec.nbytes)} of KV cache does not fit: {human_bytes(free)} is free on {device} "
                "after the weights; give a smaller size or a fraction (0.5)"
            )
        return spec.nbytes, f"{human_bytes(spec.nbytes)} as asked"
    fraction = AUTO_FRACTION[kind] if spec.fraction is None else spec.fraction
    how = "auto: " if spec.fraction is None else ""
    return int(free * fraction), f"{how}{fraction:g} of {human_bytes(free)} free on {device} after the weights"


def _meminfo_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise OSError("/proc/meminfo has no MemAvailable line")


def _cgroup_left() -> int | None:
    """cgroup v2: memory.max - memory.current of this process's cgroup, or None without a limit."""
    try:
        rel = Path("/proc/self/cgroup").read_text().strip().split("\n")[0].split("::", 1)[1]
        base = Path("/sys/fs/cgroup") / rel.lstrip("/")
        limit = (base / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((base / "memory.current").read_text()))
    except (OSError, IndexError, ValueError):
        return None


def parse_cpu_list(text: str) -> list[int]:
    """`0-3,8` -> [0, 1, 2, 3, 8]; ValueError names the problem."""
    cpus: set[int] = set()
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"{text!r} is not a CPU list such as 0-3,8")
        first, last = int(lo), int(hi) if sep else int(lo)
        if last < first:
            raise ValueError(f"{text!r}: the range {part.strip()} runs backwards")
        cpus.update(range(first, last + 1))
    return sorted(cpus)


def split_cpus(cpus: list[int], shares: list[int]) -> list[str] | None:
    """`cpus` cut into one contiguous CPU list per entry of `shares` (weights), every part non-empty;
    None when there are fewer CPUs than parts."""
    if len(cpus) < len(shares) or not shares:
        return None
    counts = [1] * len(shares)
    for _ in range(len(cpus) - len(shares)):  # the rest, one at a time, to the most underserved
        i = min(range(len(shares)), key=lambda j: (counts[j] / shares[j], -j))  # ties: the later part
        counts[i] += 1
    out, start = [], 0
    for n in counts:
        out.append(",".join(map(str, cpus[start : start + n])))
        start += n
    return out
