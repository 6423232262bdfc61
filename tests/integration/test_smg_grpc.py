"""The SGLang Model Gateway (`smg`, the real binary from PyPI) in front of pd-serve nodes as `grpc://`
workers (`--grpc-port`): a colocated node, and a prefill + decode pair in smg's gRPC PD mode.

smg tokenizes itself (`--model-path`: the model directory the node resolved, its /server_info
`model_dir`) and drives the node's SglangScheduler service; greedy output must equal the same
node's own HTTP answer (the pair's: the colocated node's). smg 1.13 sends no credential on its gRPC
calls, so the nodes it drives have no cluster token; a third node with one checks the refusals.
Every smg runs under `timeout`, every wait has a deadline. Skipped only when the smg binary is missing.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
from frontend_helpers import greedy_chat
from pd_cluster import RoleProcess
from server_helpers import NodeProcess, assert_node_idle, server_info
from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb
from smg_grpc_proto.generated import sglang_scheduler_pb2_grpc as pb_grpc

from pd_serve.bootstrap.process import ChildProcess, free_port

SMG = shutil.which("smg") or str(Path(sys.executable).parent / "smg")
pytestmark = pytest.mark.skipif(not os.path.exists(SMG), reason=f"the smg binary is missing ({SMG}): pip install smg")

SMG_LIFETIME_S = 900
SMG_READY_S = 120.0
CALL_S = 120.0  # deadline of each gRPC call
TOKEN = secrets.token_urlsafe(24)
NODE_ARGS = ["--chunked-prefill-size", "32", "--max-total-tokens", "8192"]
PROMPTS = ["The capital of France is", " ".join(f"word{i}" for i in range(60))]
MAX_TOKENS = 12


class GrpcNode:
    """A node process with its gRPC port."""

    def __init__(self, process: Any, grpc_port: int) -> None:
        self.process = process
        self.url = process.url
        self.target = f"127.0.0.1:{grpc_port}"

    def stub(self) -> tuple[grpc.Channel, Any]:
        channel = grpc.insecure_channel(self.target)
        return channel, pb_grpc.SglangSchedulerStub(channel)


class Smg(ChildProcess):
    def __init__(self, worker_args: Sequence[str], model_dir: str, expected: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = ["timeout", "-s", "KILL", str(SMG_LIFETIME_S), SMG, "launch", *worker_args, "--model-path", model_dir,
                "--host", "127.0.0.1", "--port", str(self.port), "--prometheus-host", "127.0.0.1",
                "--prometheus-port", str(free_port()), "--log-level", "warn"]
        super().__init__(argv)
        self.expected = expected
        self.wait_ready(self._ready, SMG_READY_S, f"smg on {self.url}")

    def _ready(self) -> bool:
        try:
            r = httpx.get(f"{self.url}/workers", timeout=5.0)
        except httpx.TransportError:
            return False
        workers = r.json().get("workers", []) if r.status_code == 200 else []
        return len(workers) == self.expected and all(w.get("is_healthy") for w in workers)

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", timeout=CALL_S, max_retries=0)


def _start(role: str, args: Sequence[str]) -> GrpcNode:
    port = free_port()
    grpc_args = [*NODE_ARGS, "--grpc-port", str(port), *args]
    process = NodeProcess(grpc_args) if role == "colocated" else RoleProcess(role, None, grpc_args, wait=False)
    return GrpcNode(process, port)


@pytest.fixture(scope="module")
def nodes() -> Iterator[dict[str, GrpcNode]]:
    """Open nodes for smg (colocated; prefill + decode) and a decode node with the cluster token."""
    started: list[GrpcNode] = []
    try:
        with pytest.MonkeyPatch.context() as env:
            env.delenv("PD_SERVE_CLUSTER_TOKEN", raising=False)
            for role in ("prefill", "decode"):
                started.append(_start(role, []))
            env.setenv("PD_SERVE_CLUSTER_TOKEN", TOKEN)
            started.append(_start("decode", []))
            env.delenv("PD_SERVE_CLUSTER_TOKEN")
            started.append(_start("colocated", []))
        for node in started[:3]:
            node.process.wait()
        yield dict(zip(("prefill", "decode", "guarded", "colocated"), started))
    finally:
        for node in reversed(started):
            node.process.stop()


def _reference(url: str, prompt: str) -> str:
    return greedy_chat(openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=CALL_S), prompt, False,
                       MAX_TOKENS)


def test_smg_grpc_colocated_equals_the_nodes_http_answer(nodes: dict[str, GrpcNode]) -> None:
    node = nodes["colocated"]
    router = Smg(["--worker-urls", f"grpc://{node.target}"], server_info(node.url)["model_dir"], 1)
    try:
        worker = httpx.get(f"{router.url}/workers", timeout=10.0).json()["workers"][0]
        assert worker["connection_mode"] == "grpc" and worker["model_id"] == "demo"
        for prompt in PROMPTS:
            reference = _reference(node.url, prompt)
            assert greedy_chat(router.openai(), prompt, False, MAX_TOKENS) == reference
            assert greedy_chat(router.openai(), prompt, True, MAX_TOKENS) == reference
        body = {"model": "demo", "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
        ref = httpx.post(f"{node.url}/v1/completions", json=body, timeout=CALL_S).json()["choices"][0]["text"]
        got = httpx.post(f"{router.url}/v1/completions", json=body, timeout=CALL_S)
        assert got.status_code == 200, got.text
        assert got.json()["choices"][0]["text"] == ref
    finally:
        router.stop()
    assert_node_idle(node.url)


def test_smg_grpc_pd_mode_equals_colocated(nodes: dict[str, GrpcNode]) -> None:
    prefill, decode = nodes["prefill"], nodes["decode"]
    bootstrap_port = prefill.url.rsplit(":", 1)[1]  # no --bootstrap-port: the prefill node's HTTP port
    args = ["--pd-disaggregation", "--prefill", f"grpc://{prefill.target}", bootstrap_port,
            "--decode", f"grpc://{decode.target}"]
    router = Smg(args, server_info(decode.url)["model_dir"], 2)
    try:
        received = server_info(decode.url)["stats"]["kv_pages_received"]
        for prompt in PROMPTS:
            reference = _reference(nodes["colocated"].url, prompt)
            assert greedy_chat(router.openai(), prompt, False, MAX_TOKENS) == reference
            assert greedy_chat(router.openai(), prompt, True, MAX_TOKENS) == reference
        assert server_info(decode.url)["stats"]["kv_pages_received"] > received  # disaggregated: the KV moved
    finally:
        router.stop()
    assert_node_idle(decode.url)
    assert_node_idle(prefill.url)


def _params(max_new_tokens: int) -> Any:
    return pb.SamplingParams(temperature=0, top_p=1, top_k=-1, repetition_penalty=1, n=1,
                             max_new_tokens=max_new_tokens, ignore_eos=True)


def _generate(rid: str, ids: list[int], max_new_tokens: int = MAX_TOKENS) -> Any:
    return pb.GenerateRequest(request_id=rid, tokenized=pb.TokenizedInput(input_ids=ids),
                              sampling_params=_params(max_new_tokens), stream=True)


def _auth() -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {TOKEN}")]


def test_grpc_needs_the_cluster_token_and_names_bad_fields(nodes: dict[str, GrpcNode]) -> None:
    channel, stub = nodes["guarded"].stub()
    with channel:
        with pytest.raises(grpc.RpcError) as missing:
            stub.HealthCheck(pb.HealthCheckRequest(), timeout=CALL_S)
        assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as wrong:
            list(stub.Generate(_generate("r0", [1, 2, 3]), timeout=CALL_S, metadata=[("authorization", "Bearer nope")]))
        assert wrong.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert stub.HealthCheck(pb.HealthCheckRequest(), timeout=CALL_S, metadata=_auth()).healthy
        loads = stub.GetLoads(pb.GetLoadsRequest(include=["core"]), timeout=CALL_S, metadata=_auth())
        assert loads.loads[0].max_total_num_tokens > 0
        for request, field in (
            (_generate("r1", []), "tokenized.input_ids"),
            (_generate("r2", [10**9]), "tokenized.input_ids"),
            (pb.GenerateRequest(request_id="r3", tokenized=pb.TokenizedInput(input_ids=[1]),
                                sampling_params=pb.SamplingParams(temperature=-1, max_new_tokens=4)),
             "sampling_params.temperature"),
        ):
            with pytest.raises(grpc.RpcError) as bad:
                list(stub.Generate(request, timeout=CALL_S, metadata=_auth()))
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert (bad.value.details() or "").startswith(field), bad.value.details()
        with pytest.raises(grpc.RpcError) as embed:
            stub.Embed(pb.EmbedRequest(request_id="e"), timeout=CALL_S, metadata=_auth())
        assert embed.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_cancelling_or_aborting_a_stream_frees_its_pages(nodes: dict[str, GrpcNode]) -> None:
    node = nodes["guarded"]
    channel, stub = node.stub()
    with channel:
        call = stub.Generate(_generate("cancelled", list(range(1, 40)), 2000), timeout=CALL_S, metadata=_auth())
        first = next(call)
        assert first.WhichOneof("response") == "chunk" and first.chunk.token_ids
        assert server_info(node.url)["idle"]["engine_requests"] == 1
        call.cancel()
        assert_node_idle(node.url)
        call = stub.Generate(_generate("aborted", list(range(1, 40)), 2000), timeout=CALL_S, metadata=_auth())
        next(call)
        answer = stub.Abort(pb.AbortRequest(request_id="aborted"), timeout=CALL_S, metadata=_auth())
        assert answer.success, answer.message
        last = list(call)[-1]
        assert last.complete.finish_reason == "abort" and last.complete.completion_tokens < 2000
    assert_node_idle(node.url)
