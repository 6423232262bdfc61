"""llama.cpp as a peer for bench/compare_peers.py: build `llama-server` once, make the F32 GGUF, run the server.

Calls, in order:
- `ensure_build(cache)`: the `llama-cpp-python` sdist from PyPI (pip download, kept in `cache`), unpacked,
  and its vendored `vendor/llama.cpp` configured with `CMAKE_FLAGS` and built (targets `llama-server`,
  `llama-quantize`) into `cache/build-VERSION/`. Idempotent: a present sdist is not downloaded again,
  an unpacked one not unpacked again, and cmake rebuilds nothing that is up to date (seconds). Writes
  `build-VERSION/pd-serve-build.json` (version, commit, flags, compiler, first build's duration).
- `ensure_f32(build, q4_gguf, cache)`: the same weights dequantized to float32, as pd-serve computes
  with them, by `llama-quantize --allow-requantize IN OUT F32`; made once.
- `weight_diff(a, b)`: the largest difference between two GGUFs' tensors, dequantized with the `gguf`
  package (the one pd-serve dequantizes with), to show that both systems run the same numbers.
- `llama_server(build, model, ...)`: a started `llama-server`, healthy, stopped at the end of the block.

Never writes inside the repository and never installs anything into the environment.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_cluster import Child, free_port  # noqa: E402

PACKAGE = "llama-cpp-python"
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_CURL=OFF",
    "-DGGML_NATIVE=ON",  # -march=native: the machine's own SIMD (AVX-512 where it has it)
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # never fetch the web UI
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
)
TARGETS = ("llama-server", "llama-quantize")
DEFAULT_CACHE = Path.home() / ".cache" / "pd-serve" / "peers"
READY_TIMEOUT_S = 300.0
STOP_GRACE_S = 10.0


@dataclass(frozen=True)
class LlamaBuild:
    version: str  # of the llama-cpp-python sdist
    commit: str  # llama.cpp's, as `llama-server --version` reports it
    version_line: str
    cmake_flags: tuple[str, ...]
    compiler: str
    build_seconds: float | None  # the first build's wall time; None when not measured
    build_dir: str

    @property
    def server(self) -> Path:
        return Path(self.build_dir) / "bin" / "llama-server"

    @property
    def quantize(self) -> Path:
        return Path(self.build_dir) / "bin" / "llama-quantize"

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "cmake_flags": list(self.cmake_flags)}


def _run(argv: list[str], log: Path, what: str) -> None:
    with open(log, "ab") as out:
        out.write(f"\n$ {' '.join(argv)}\n".encode())
        out.flush()
        rc = subprocess.call(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if rc != 0:
        raise RuntimeError(f"{what} failed with exit code {rc}; see {log}")


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", name))


def ensure_sdist(cache: Path, version: str | None) -> Path:
    """The sdist in `cache` (the newest there when `version` is None), downloaded when missing."""
    cache.mkdir(parents=True, exist_ok=True)
    pattern = f"llama_cpp_python-{version or '*'}.tar.gz"
    found = sorted(cache.glob(pattern), key=lambda p: _version_key(p.name))
    if found:
        return found[-1]
    spec = f"{PACKAGE}=={version}" if version else PACKAGE
    print(f"downloading the {spec} sdist into {cache}", file=sys.stderr)
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            spec,
            "-d",
            str(cache),
        ],
        cache / "download.log",
        f"pip download {spec}",
    )
    found = sorted(cache.glob(pattern), key=lambda p: _version_key(p.name))
    if not found:
        raise RuntimeError(f"pip download {spec} left no {pattern} in {cache}; see {cache / 'download.log'}")
    return found[-1]


def ensure_source(cache: Path, version: str | None) -> tuple[str, Path]:
    """(sdist version, the vendored llama.cpp source directory), unpacking the sdist once."""
    sdist = ensure_sdist(cache, version)
    name = sdist.name.removesuffix(".tar.gz")
    src = cache / name / "vendor" / "llama.cpp"
    if not (src / "CMakeLists.txt").is_file():
        with tarfile.open(sdist) as tar:
            tar.extractall(cache, filter="data")
    if not (src / "CMakeLists.txt").is_file():
        raise RuntimeError(
            f"{sdist} has no vendor/llama.cpp/CMakeLists.txt; pass another --llama-cpp-version"
        )
    return name.split("-", 1)[1], src


def ensure_build(
    cache: Path = DEFAULT_CACHE, version: str | None = None, jobs: int | None = None
) -> LlamaBuild:
    """Configure and build the targets (cmake skips what is up to date); the build's record."""
    version, src = ensure_source(cache, version)
    build_dir = cache / f"build-{version}"
    info_path = build_dir / "pd-serve-build.json"
    log = cache / f"build-{version}.log"
    configure = ["cmake", "-S", str(src), "-B", str(build_dir), *CMAKE_FLAGS]
    if not (build_dir / "CMakeCache.txt").exists() and shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    fresh = not all((build_dir / "bin" / t).is_file() for t in TARGETS)
    if fresh:
        print(
            f"building llama.cpp ({version}) in {build_dir}: 15-25 minutes on 2 cores; log {log}",
            file=sys.stderr,
        )
    t0 = time.monotonic()
    _run(configure, log, "cmake configure")
    _run(
        ["cmake", "--build", str(build_dir), "--target", *TARGETS, "-j", str(jobs or os.cpu_count() or 2)],
        log,
        "cmake --build",
    )
    seconds = time.monotonic() - t0 if fresh else None
    old = json.loads(info_path.read_text()) if info_path.exists() else {}
    line = _server_version(build_dir / "bin" / "llama-server")
    commit = m.group(1) if (m := re.search(r"(?:commit |\()([0-9a-f]{7,40})\b", line)) else "unknown"
    build = LlamaBuild(
        version, commit, line, CMAKE_FLAGS, _compiler(), old.get("build_seconds", seconds), str(build_dir)
    )
    info_path.write_text(json.dumps(build.as_json(), indent=1) + "\n")
    return build


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("c++") or "c++"
    out = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout
    return out.splitlines()[0] if out else cxx


def _server_version(server: Path) -> str:
    """The 'version: 0.5.0-dev (build 1, commit 0c1e570)' line of `llama-server --version` (on stderr)."""
    out = subprocess.run([str(server), "--version"], capture_output=True, text=True, timeout=60, check=False)
    lines = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("version")]
    return lines[0].strip() if lines else "unknown"


def ensure_f32(build: LlamaBuild, q4_gguf: Path, cache: Path = DEFAULT_CACHE) -> Path:
    """`q4_gguf` with every tensor dequantized to F32 (made once, next to the build)."""
    out = cache / f"{q4_gguf.stem.split('.')[0]}.F32.gguf"
    if out.is_file():
        return out
    tmp = out.with_suffix(".gguf.tmp")
    _run(
        [str(build.quantize), "--allow-requantize", str(q4_gguf), str(tmp), "F32"],
        cache / "quantize.log",
        "llama-quantize to F32",
    )
    tmp.rename(out)
    return out


def weight_diff(a: Path, b: Path) -> dict[str, Any]:
    """Max |a - b| over all tensors, both dequantized to float32 by `gguf` (pd-serve's dequantizer)."""
    import gguf
    import numpy as np

    ta = {t.name: t for t in gguf.GGUFReader(str(a)).tensors}
    tb = {t.name: t for t in gguf.GGUFReader(str(b)).tensors}
    if set(ta) != set(tb):
        return {
            "same_tensors": False,
            "only_in_a": sorted(set(ta) - set(tb)),
            "only_in_b": sorted(set(tb) - set(ta)),
        }
    worst, worst_name = 0.0, None
    for name, t in ta.items():
        xa = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        xb = gguf.quants.dequantize(tb[name].data, tb[name].tensor_type).astype(np.float32)
        diff = float(np.max(np.abs(xa.reshape(-1) - xb.reshape(-1)))) if xa.size == xb.size else float("inf")
        if diff > worst:
            worst, worst_name = diff, name
    return {"same_tensors": True, "tensors": len(ta), "max_abs_diff": worst, "worst_tensor": worst_name}


def server_argv(
    build: LlamaBuild, model: Path, port: int, parallel: int, ctx_per_slot: int, threads: int, alias: str
) -> list[str]:
    """llama-server with `parallel` slots of `ctx_per_slot` tokens each, continuous batching, `threads` threads."""
    return [str(build.server), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
            "-np", str(parallel), "-c", str(parallel * ctx_per_slot), "--cont-batching", "-t", str(threads),
            "--alias", alias]  # fmt: skip


class ServerCrashed(RuntimeError):
    def __init__(self, name: str, returncode: int, log: Path) -> None:
        super().__init__(f"{name} exited with {returncode} before it was healthy; see {log}")
        self.returncode = returncode


def _start(argv: list[str], port: int, log_dir: Path, name: str, threads: int) -> Child:
    """`argv` started and answering /health with 200 (llama-server loads and warms the model first)."""
    child = Child(name, argv, port, log_dir, cpus=None, threads=threads)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not child.healthy():
        if child.popen.poll() is not None:
            raise ServerCrashed(name, child.popen.returncode, child.log_path)
        if time.monotonic() > deadline:
            _stop(child)
            raise TimeoutError(f"{name} not healthy within {READY_TIMEOUT_S:.0f} s; see {child.log_path}")
        time.sleep(0.3)
    return child


def _stop(child: Child) -> None:
    child.signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.popen.wait(STOP_GRACE_S)
    child.signal(signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.popen.wait(5.0)


@contextlib.contextmanager
def llama_server(
    argv: list[str], port: int, log_dir: Path, name: str, threads: int
) -> Iterator[tuple[str, list[str]]]:
    """Start `argv` (a server_argv), yield (URL, the argv that runs); SIGTERM then SIGKILL at the end.

    A CPU may advertise AMX and still fault on it (seen on a KVM guest: SIGILL in ggml's AMX Q4_1
    kernel during the warm-up). Then the server is started again with `--no-repack`, which turns off
    ggml's extra buffer types (AMX and the repacked layouts); the argv it yields says so."""
    log_dir.mkdir(parents=True, exist_ok=True)
    try:
        child = _start(argv, port, log_dir, name, threads)
    except ServerCrashed as exc:
        if exc.returncode != -signal.SIGILL or "--no-repack" in argv:
            raise
        print(f"{exc}: illegal instruction; starting it again with --no-repack", file=sys.stderr)
        argv = [*argv, "--no-repack"]
        child = _start(argv, port, log_dir, f"{name}-no-repack", threads)
    try:
        yield child.url, argv
    finally:
        _stop(child)


__all__ = [
    "DEFAULT_CACHE",
    "LlamaBuild",
    "ServerCrashed",
    "ensure_build",
    "ensure_f32",
    "free_port",
    "llama_server",
    "server_argv",
    "weight_diff",
]
