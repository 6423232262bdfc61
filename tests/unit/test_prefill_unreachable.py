"""A decode node that cannot reach the request's prefill node for the KV says so with a typed code,
`ErrorCode.PREFILL_UNREACHABLE`, from the transfer room up to the HTTP answer: the frontend blames
that prefill node by the same member, never by the words of the reason."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

from pd_serve.config import DisaggConfig, EngineConfig
from pd_serve.engine import messages as m
from pd_serve.engine.core import EngineCore
from pd_serve.engine.sampling_params import SamplingParams
from pd_serve.openai_errors import ErrorCode
from pd_serve.server.roles import DecodeBackend, Registration
from pd_serve.server.schemas import PDParams
from pd_serve.transfer import TransferConfig


def _refused_endpoint() -> str:
    with socket.socket() as sock:  # bound, never listening: a connection to it is refused
        sock.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{sock.getsockname()[1]}"


def test_a_refused_transfer_endpoint_fails_the_request_as_prefill_unreachable(demo_dir: Path) -> None:
    config = EngineConfig(model=str(demo_dir), max_total_tokens=512, show_progress=False)
    transfer = TransferConfig(backend="tcp", bootstrap_timeout=5, queue_timeout=5, waiting_timeout=10, transfer_timeout=5)
    d = EngineCore(config, DisaggConfig("decode", transfer))
    try:
        d.add_request("r", [5, 6, 7, 8], SamplingParams(max_tokens=2), m.PDSpec(7, _refused_endpoint()))
        deltas: list[m.RequestDelta] = []
        deadline = time.monotonic() + 30
        while d.has_unfinished():
            assert time.monotonic() < deadline, "the room did not fail"
            deltas += d.step()
            time.sleep(0.001)
        last = deltas[-1]
        assert last.finish_reason == "abort" and last.error is not None and last.error.startswith("cannot connect to")
        assert last.error_code == ErrorCode.PREFILL_UNREACHABLE
        assert d.stats().num_free_pages == d.stats().num_total_pages
    finally:
        d.close()


def test_the_decode_backend_names_the_prefill_node_by_the_code_alone(demo_dir: Path) -> None:
    """The decode backend rewrites the engine's refusal by its code (whatever the reason's words), and
    leaves a refusal without that code alone."""
    config = EngineConfig(model=str(demo_dir), max_total_tokens=512, show_progress=False)
    disagg = DisaggConfig("decode", TransferConfig(backend="tcp"))
    backend = DecodeBackend(config, disagg, Registration(None, "d0", "http://127.0.0.1:1"))
    refusals = iter([("some words", ErrorCode.PREFILL_UNREACHABLE), ("cannot connect to x", None)])

    class FakeClient:
        async def generate(self, request_id: str, *_: object, **__: object) -> AsyncIterator[m.RequestDelta]:
            error, code = next(refusals)
            yield m.RequestDelta(request_id, [], "", True, "abort", error=error, error_code=code)

    async def endpoint(_: PDParams) -> tuple[str, str, None, None]:
        return "tcp://127.0.0.1:1", "", None, None

    async def run() -> list[m.RequestDelta]:
        backend.client = FakeClient()  # type: ignore[assignment]
        backend._peer_endpoint = endpoint  # type: ignore[method-assign]
        pd = PDParams(room=1, prefill="p0", decode="d0", prefill_url="http://127.0.0.1:2")
        out = [d async for d in backend.generate([1, 2], SamplingParams(), "a", pd)]
        out += [d async for d in backend.generate([1, 2], SamplingParams(), "b", pd)]
        await backend._directory.aclose()
        return out

    named, other = asyncio.run(run())
    assert named.error == "prefill node 'p0': some words" and named.error_code == ErrorCode.PREFILL_UNREACHABLE
    assert other.error == "cannot connect to x" and other.error_code is None


def test_an_error_code_member_is_its_string_everywhere() -> None:
    """JSON (orjson and json), str(), f-strings and comparison all see the plain code."""
    import json

    import orjson

    from pd_serve.openai_errors import error_body

    body = error_body(503, "x", code=ErrorCode.PREFILL_UNREACHABLE)
    assert orjson.loads(orjson.dumps(body))["error"]["code"] == "prefill_unreachable"
    assert json.loads(json.dumps(body))["error"]["code"] == "prefill_unreachable"
    assert str(ErrorCode.NO_PAIR) == f"{ErrorCode.NO_PAIR}" == "no_pair" == ErrorCode.NO_PAIR
