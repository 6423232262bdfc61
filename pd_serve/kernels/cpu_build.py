"""Compile a C source string into a shared library once per machine, and load it with ctypes.

The CPU kernels (`cpu_native`: decode attention; `cpu_ops`: linear, norm, rotary, activation) are
plain C with no torch headers, so a build takes about a second: `cc -O3 -march=native -fopenmp
-shared -fPIC`, into `$PD_SERVE_CACHE/kernels/` (default `~/.cache/pd-serve/kernels/`), named by a
hash of the source, the flags and the CPU, and renamed into place atomically so that concurrent
processes can race safely. The libraries link the libgomp torch has loaded, so they share its thread
pool. `PD_SERVE_CPU_NATIVE=0` turns every CPU kernel off; without a compiler, or when a build fails,
`load` returns None with a warning and the callers keep their torch path. It never raises for a
missing or broken toolchain.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

ENV_VAR = "PD_SERVE_CPU_NATIVE"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c99")


def _cache_dir() -> Path:
    return Path(os.environ.get("PD_SERVE_CACHE", Path.home() / ".cache" / "pd-serve")) / "kernels"


def _cpu_id() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(compiler: str, name: str, source: str, flags: tuple[str, ...]) -> Path:
    key = hashlib.sha256("\0".join([source, compiler, *flags, platform.machine(), _cpu_id()]).encode())
    target = _cache_dir() / f"{name}-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src, lib = Path(tmp) / f"{name}.c", Path(tmp) / f"{name}.so"
        src.write_text(source)
        subprocess.run([compiler, *flags, str(src), "-o", str(lib), "-lm"], check=True, capture_output=True,
                       timeout=120)
        os.replace(lib, target)
    return target


def load(name: str, source: str, extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """The built library, or None (disabled by PD_SERVE_CPU_NATIVE=0, no compiler, or the build failed:
    logged). `name` names the file and the log line; callers cache the result."""
    if os.environ.get(ENV_VAR, "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler found: the CPU kernel %s is off (the torch path runs instead)", name)
        return None
    try:
        return ctypes.CDLL(str(_build(compiler, name, source, (*FLAGS, *extra_flags))))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        log.warning("building the CPU kernel %s failed (%s %s): the torch path runs instead",
                    name, exc, detail.decode(errors="replace")[-500:])
        return None
