"""The engine loop in its own process, fed over ZMQ.

The API process PUSHes `AddRequest`, `AbortRequest`, `FlushCache`, `GetStats` and `Shutdown`
to the engine's input socket; the engine PUSHes `EngineReady` (once, first), `StepOutputs`, `Reply`
(carrying the control message's `call_id`) and `EngineStats` back.
`EngineStats` goes out at least every `HEARTBEAT_S`, so the other side can tell a live loop from a
dead or stuck one. The loop never blocks while it has work; idle, it waits on the input socket.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass

import orjson
import zmq

from pd_serve.config import DisaggConfig, EngineConfig
from pd_serve.engine import messages as m
from pd_serve.engine.sampling_params import InvalidParameter
from pd_serve.engine.scheduler import RequestRejected
from pd_serve.logs import LogConfig, setup_logging

log = logging.getLogger(__name__)
HEARTBEAT_S = 0.5
ROOM_POLL_MS = 1
ORPHAN_POLL_S = 0.5  # how often the engine checks that its API process is alive
ORPHAN_GRACE_S = 10.0  # then how long it may take to stop before it exits hard


@dataclass(frozen=True)
class EngineAddresses:
    """ZMQ endpoints of one engine process; unique per API process (pid and uuid in the name)."""

    inputs: str
    outputs: str

    @staticmethod
    def fresh(directory: str | None = None) -> EngineAddresses:
        base = os.path.join(directory or tempfile.gettempdir(), f"pd-serve-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        return EngineAddresses(inputs=f"ipc://{base}-in", outputs=f"ipc://{base}-out")


def run_engine(
    config: EngineConfig,
    addrs: EngineAddresses,
    disagg: DisaggConfig | None = None,
    log_config: LogConfig | None = None,
    api_pid: int | None = None,
) -> None:
    """Process entry point: build the engine, announce readiness, loop until Shutdown or a signal.
    `log_config`: the API process's logging (`pd_serve.logs.current()`); the role gets "/engine" added.
    Without one: text at info, role "engine". `api_pid`: the API process that spawned this one; the
    engine stops when it is gone (`stop_when_orphaned`)."""
    parent = log_config or LogConfig("engine")
    setup_logging(f"{parent.role}/engine" if log_config else "engine", parent.level, parent.fmt)
    ctx = zmq.Context()
    out = ctx.socket(zmq.PUSH)
    out.setsockopt(zmq.LINGER, 1000)
    out.connect(addrs.outputs)
    inp = ctx.socket(zmq.PULL)
    inp.bind(addrs.inputs)
    stop = {"flag": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the API process decides when we stop
    if api_pid is not None:
        stop_when_orphaned(api_pid, stop)
    try:
        from pd_serve.engine.core import EngineCore

        if config.cpus is not None:  # before torch starts its thread pools
            import torch

            from pd_serve.kv_budget import parse_cpu_list

            cpus = parse_cpu_list(config.cpus)
            os.sched_setaffinity(0, cpus)
            torch.set_num_threads(len(cpus))
            log.info("engine pinned to CPUs %s (%d threads)", config.cpus, len(cpus))
        core = EngineCore(config, disagg)
    except Exception as exc:  # reported to the API process, which exits with the message
        out.send(m.encode(m.Reply("failed", {"error": f"{type(exc).__name__}: {exc}"})))
        raise
    memory = core.memory()
    out.send(m.encode(m.EngineReady(
        layout=core.kv.layout,
        max_model_len=core.max_model_len,
        config=asdict(config),
        model_dir=str(core.model_dir),
        role=disagg.role if disagg else "colocated",
        transfer_endpoint=core.connector.endpoint,
        transfer_backend=disagg.transfer.backend if disagg else None,
        transfer_backends=list(core.connector.backends),
        num_pages=core.kv.num_pages,
        max_running_requests=config.max_running_requests,
        memory=memory,
    )))
    log.info("engine ready: weights %s, KV pools %s (%s; %d pages of %d tokens: %d tokens), %s",
             mib(memory["weights_bytes"]), mib(memory["kv_cache_bytes"]), core.kv_budget_how, core.kv.num_pages,
             config.page_size, memory["kv_capacity_tokens"],
             f"transfer endpoint {core.connector.endpoint}" if core.connector.endpoint else "no transfer")
    try:
        EngineLoop(core, inp, out, stop).run()
    finally:
        core.close()
    out.close()
    inp.close()
    ctx.term()


def mib(nbytes: int) -> str:
    return f"{nbytes / (1 << 20):.1f} MiB"


def stop_when_orphaned(api_pid: int, stop: dict[str, bool], grace_s: float = ORPHAN_GRACE_S) -> threading.Thread:
    """Stop this engine once its API process is gone without stopping it: killed (SIGKILL, the OOM
    killer), crashed, or stopped by a signal while it started. An orphan would hold its GPU memory and
    its transfer port, and the API process Granian starts in its place could not start its engine.
    The loop sees `stop` between steps; should the engine still run `grace_s` later (loading weights,
    stuck in a step), the process exits hard, which frees its memory all the same."""

    def watch() -> None:
        while os.getppid() == api_pid:
            time.sleep(ORPHAN_POLL_S)
        log.warning("the API process (pid %d) is gone: stopping this engine", api_pid)
        stop["flag"] = True
        time.sleep(grace_s)
        log.error("the engine did not stop within %g s of its API process's end: exiting now", grace_s)
        os._exit(1)

    thread = threading.Thread(target=watch, name="pd-serve-orphan-watch", daemon=True)
    thread.start()
    return thread


class EngineLoop:
    def __init__(self, core, inp: zmq.Socket, out: zmq.Socket, stop: dict[str, bool]) -> None:  # noqa: ANN001
        self.core, self.inp, self.out, self.stop = core, inp, out, stop
        self.last_stats = 0.0
        self.profiler: EngineProfiler | None = None

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.inp, zmq.POLLIN)
        while not self.stop["flag"]:
            if self.core.has_schedulable():
                timeout = 0
            elif self.core.has_unfinished():
                timeout = ROOM_POLL_MS  # only rooms to watch: poll them often, without spinning
            else:
                timeout = int(HEARTBEAT_S * 1000)
            while poller.poll(timeout):
                data = self.inp.recv()
                try:
                    msg = m.decode(data)
                except (ValueError, KeyError, TypeError) as exc:  # one bad message fails its request, not the engine
                    self._refuse(data, exc)
                    continue
                if not self._handle(msg):
                    return
                timeout = 0
            if self.core.has_unfinished():
                deltas = self.core.step()
                if deltas:
                    self.out.send(m.encode(m.StepOutputs(deltas)))
            self._heartbeat()
        # SIGTERM: abort what is in flight so every client gets its finish
        self._abort_all()

    def _handle(self, msg: object) -> bool:
        core = self.core
        if isinstance(msg, m.AddRequest):
            try:
                core.add_request(msg.request_id, msg.prompt_token_ids, msg.sampling, msg.pd)
            except (RequestRejected, InvalidParameter, ValueError) as exc:
                param = getattr(exc, "param", None)
                delta = m.RequestDelta(msg.request_id, [], "", finished=True, finish_reason="abort",
                                       error=str(exc), error_param=param)
                self.out.send(m.encode(m.StepOutputs([delta])))
        elif isinstance(msg, m.AbortRequest):
            core.abort(msg.request_id, "aborted by the client")
        elif isinstance(msg, m.FlushCache):
            freed = core.flush_prefix_cache()
            self.out.send(m.encode(m.Reply("flushed", {"freed_pages": freed}, call_id=msg.call_id)))
        elif isinstance(msg, (m.StartProfile, m.StopProfile)):
            reply = self._profile(msg)
            reply.call_id = msg.call_id
            self.out.send(m.encode(reply))
        elif isinstance(msg, m.GetStats):
            self._heartbeat(force=True)
        elif isinstance(msg, m.Shutdown):
            self._abort_all()
            return False
        return True

    def _refuse(self, data: bytes, exc: Exception) -> None:
        """Answer an undecodable message: its request (if one can be named) finishes with the error."""
        log.error("engine: dropped a message it cannot decode (%s: %s)", type(exc).__name__, exc)
        try:
            request_id = orjson.loads(data)["body"]["request_id"]
        except (ValueError, KeyError, TypeError):
            return
        if isinstance(request_id, str):
            delta = m.RequestDelta(request_id, [], "", finished=True, finish_reason="abort",
                                   error=f"the engine could not decode the request: {type(exc).__name__}: {exc}")
            self.out.send(m.encode(m.StepOutputs([delta])))

    def _profile(self, msg: m.StartProfile | m.StopProfile) -> m.Reply:
        if isinstance(msg, m.StartProfile):
            if self.profiler is not None:
                return m.Reply("profile", {"error": "a profile is already running; stop it first"})
            try:
                self.profiler = EngineProfiler(msg.directory)
            except OSError as exc:  # an unusable directory must not stop the loop
                return m.Reply("profile", {"error": f"cannot write traces to {msg.directory!r}: {exc.strerror}"})
            return m.Reply("profile", {"directory": msg.directory})
        if self.profiler is None:
            return m.Reply("profile", {"error": "no profile is running; start one first"})
        path, self.profiler = self.profiler.stop(), None
        return m.Reply("profile", {"trace": path})

    def _abort_all(self) -> None:
        self.core.abort_all()
        deltas = self.core.step()
        if deltas:
            self.out.send(m.encode(m.StepOutputs(deltas)))

    def _heartbeat(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last_stats >= HEARTBEAT_S:
            self.last_stats = now
            self.out.send(m.encode(self.core.stats()))


class EngineProfiler:
    """torch.profiler around the engine loop; `stop()` writes a Chrome trace and returns its path."""

    def __init__(self, directory: str) -> None:
        import torch

        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(activities=activities)
        self.prof.start()

    def stop(self) -> str:
        self.prof.stop()
        path = os.path.join(self.directory, f"engine-{os.getpid()}-{int(time.time() * 1000)}.trace.json")
        self.prof.export_chrome_trace(path)
        return path
