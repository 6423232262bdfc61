"""Two engines, prefill and decode, moving KV through real rooms (tcp backend on loopback).

Both engines live in this process here (each TransferEngine has its own thread and socket); the
integration tests run them as separate node processes.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pd_serve import LLM, SamplingParams
from pd_serve.config import DisaggConfig, EngineConfig
from pd_serve.engine.core import EngineCore
from pd_serve.engine.messages import PDSpec, RequestDelta
from pd_serve.transfer import TransferConfig


@pytest.fixture(scope="module")
def pair(demo_dir: Path):
    config = EngineConfig(model=str(demo_dir), max_total_tokens=2048, show_progress=False, chunked_prefill_size=64)
    transfer = TransferConfig(backend="tcp", bootstrap_timeout=5, queue_timeout=5, waiting_timeout=10, transfer_timeout=5)
    p = EngineCore(config, DisaggConfig("prefill", transfer))
    d = EngineCore(config, DisaggConfig("decode", transfer))
    yield p, d, config
    p.close()
    d.close()


def _run(p: EngineCore, d: EngineCore, deadline_s: float = 60.0) -> tuple[list[RequestDelta], list[RequestDelta]]:
    pd_out: list[RequestDelta] = []
    dd_out: list[RequestDelta] = []
    deadline = time.monotonic() + deadline_s
    while p.has_unfinished() or d.has_unfinished():
        assert time.monotonic() < deadline, "disaggregated requests did not finish"
        pd_out += p.step()
        dd_out += d.step()
        time.sleep(0.001)
    return pd_out, dd_out


def _by_request(deltas: list[RequestDelta]) -> dict[str, list[RequestDelta]]:
    out: dict[str, list[RequestDelta]] = {}
    for x in deltas:
        out.setdefault(x.request_id, []).append(x)
    return out


def test_disaggregated_output_equals_colocated(pair) -> None:
    p, d, config = pair
    prompts = [list(range(20, 20 + n)) for n in (3, 17, 40, 150)]
    params = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=9, temperature=0.8, seed=11, ignore_eos=True, logprobs=2),
              SamplingParams(max_tokens=1, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=5, ignore_eos=True)]
    colocated = LLM(config=config).generate(prompts, params)
    for i, (prompt, sp) in enumerate(zip(prompts, params)):
        room = 1000 + i
        d.add_request(f"r{i}", prompt, sp, PDSpec(room, p.connector.endpoint))
        p.add_request(f"r{i}", prompt, sp, PDSpec(room))
    p_deltas, d_deltas = _run(p, d)
    decoded = _by_request(d_deltas)
    for i, expected in enumerate(colocated):
        got = decoded[f"r{i}"]
        assert [t for x in got for t in x.new_token_ids] == expected.token_ids
        assert "".join(x.new_text for x in got) == expected.text
        assert got[-1].finish_reason == expected.finish_reason
    assert decoded["r1"][0].logprobs is not None and len(decoded["r1"][0].logprobs[0].top) == 2
    prefilled = _by_request(p_deltas)
    assert all(v[-1].finished and v[-1].info and v[-1].info["total_s"] >= 0 for v in prefilled.values())
    for engine in (p, d):
        s = engine.stats()
        assert s.num_free_pages == s.num_total_pages and s.num_in_transfer == 0


def test_idle_engines_still_report_their_room_and_transfer_counters(pair) -> None:
    p, d, _ = pair
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    for i in range(2):  # rooms of its own: the test passes alone and in any order
        d.add_request(f"c{i}", list(range(60, 80)), params, PDSpec(1500 + i, p.connector.endpoint))
        p.add_request(f"c{i}", list(range(60, 80)), params, PDSpec(1500 + i))
    _run(p, d)
    assert not p.has_unfinished() and not d.has_unfinished()
    ps, ds = p.stats(), d.stats()
    assert ps.rooms_succeeded >= 2 and ds.rooms_succeeded >= 2
    assert ps.kv_pages_sent > 0 and ds.kv_pages_received > 0
    assert ps.transfer["sent_bytes"] > 0 and ds.transfer["received_bytes"] > 0
    assert ps.transfer["live_senders"] == 0 and ds.transfer["live_receivers"] == 0
    assert ps.num_requests == 0 and ds.num_requests == 0


def test_prompt_mismatch_fails_the_room_on_both_sides(pair) -> None:
    p, d, _ = pair
    params = SamplingParams(max_tokens=4, temperature=0)
    d.add_request("m", [30, 31, 32, 33], params, PDSpec(2001, p.connector.endpoint))
    p.add_request("m", [30, 31, 32, 99], params, PDSpec(2001))
    p_deltas, d_deltas = _run(p, d)
    assert p_deltas[-1].finish_reason == "abort" and "prompt mismatch" in (p_deltas[-1].error or "")
    assert d_deltas[-1].finish_reason == "abort" and d_deltas[-1].error
    assert d.stats().num_free_pages == d.stats().num_total_pages


def test_a_first_token_outside_the_vocabulary_fails_the_decode_request(pair, monkeypatch) -> None:
    """A prefill peer holds the cluster token but sends a token id the model has no embedding for."""
    p, d, config = pair
    vocab = d.model_config.vocab_size
    sent = p.connector.take_sampled
    monkeypatch.setattr(p.connector, "take_sampled", lambda req, token, lp: sent(req, vocab + 7, lp))
    params = SamplingParams(max_tokens=4, temperature=0)
    d.add_request("v", [50, 51, 52, 53], params, PDSpec(2501, p.connector.endpoint))
    p.add_request("v", [50, 51, 52, 53], params, PDSpec(2501))
    _, d_deltas = _run(p, d)
    assert d_deltas[-1].finish_reason == "abort"
    assert f"first token {vocab + 7}, outside the vocabulary" in (d_deltas[-1].error or "")
    assert d.stats().num_free_pages == d.stats().num_total_pages
    monkeypatch.undo()
    d.add_request("w", [50, 51, 52, 53], params, PDSpec(2502, p.connector.endpoint))  # the pair still works
    p.add_request("w", [50, 51, 52, 53], params, PDSpec(2502))
    _, d_deltas = _run(p, d)
    assert d_deltas[-1].finish_reason == "length"


def test_decode_abort_while_waiting_for_prefill_frees_pages(pair) -> None:
    p, d, _ = pair
    d.add_request("a", list(range(40, 80)), SamplingParams(max_tokens=4), PDSpec(3001, p.connector.endpoint))
    for _ in range(5):
        d.step()
    d.abort("a", "client went away")
    _, d_deltas = _run(p, d)
    assert d_deltas[-1].finish_reason == "abort"
    assert d.stats().num_free_pages == d.stats().num_total_pages
    # the prefill side learnt of the abort: a late request for that room fails there too
    p.add_request("a", list(range(40, 80)), SamplingParams(max_tokens=4), PDSpec(3001))
    p_deltas, _ = _run(p, d)
    assert p_deltas[-1].finish_reason == "abort"
    assert p.stats().num_free_pages == p.stats().num_total_pages


def test_pd_request_on_a_colocated_engine_is_rejected(demo_dir: Path) -> None:
    from pd_serve.engine.scheduler import RequestRejected

    llm = LLM(model=str(demo_dir), show_progress=False, max_total_tokens=256)
    with pytest.raises(RequestRejected) as e:
        llm.engine.add_request("x", [1, 2, 3], SamplingParams(), PDSpec(1, "tcp://127.0.0.1:1"))
    assert e.value.param == "pd"


def test_decode_prefix_cache_shrinks_the_transfer(pair) -> None:
    p, d, config = pair
    shared = list(range(100, 180))  # 5 full pages of 16
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    expected = LLM(config=config).generate([shared + [7, 8, 9]], params)[0]
    before = d.stats()
    for i, prompt in enumerate([shared + [1, 2, 3], shared + [7, 8, 9]]):
        d.add_request(f"s{i}", prompt, params, PDSpec(5000 + i, p.connector.endpoint))
        p.add_request(f"s{i}", prompt, params, PDSpec(5000 + i))
        _, d_deltas = _run(p, d)
    after = d.stats()
    assert after.kv_pages_received - before.kv_pages_received == 6 + 1  # 6 pages, then only the last one
    assert after.kv_pages_reused - before.kv_pages_reused == 5
    second = _by_request(d_deltas)["s1"]
    assert [t for x in second for t in x.new_token_ids] == expected.token_ids
    assert after.num_free_pages == after.num_total_pages
