"""Every live process's /proc/PID/stat fields, for the benchmarks' CPU accounting and the tests that
look for processes left behind."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path


def stat_fields() -> Iterator[tuple[int, list[str]]]:
    """(pid, the stat fields after the command name) of every process: fields[0] is the state,
    [1] the parent pid, [3] the session id, [11] and [12] user and system time in clock ticks."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                yield int(entry.name), (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
