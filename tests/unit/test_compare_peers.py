"""bench/compare_peers.py's pure parts: prompts, workload, verification, ratios, the page; no build, no server."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import compare_peers as cp  # noqa: E402
import peers_llamacpp  # noqa: E402
import peers_report  # noqa: E402
from serving_metrics import RequestRecord  # noqa: E402


def make_row(system: str, c: int, tok_s: float, itl: float) -> dict[str, object]:
    return {"system": system, "concurrency": c, "requests": 4, "verified": 4, "prompt_tokens_mean": 250.0,
            "output_tok_s": tok_s, "ttft_p50_ms": 300.0, "ttft_p99_ms": 400.0, "itl_p50_ms": itl,
            "itl_p99_ms": 2 * itl}  # fmt: skip


def test_prompts_are_deterministic_and_start_apart() -> None:
    a, b = cp.prompt_text(0, 200, seed=0), cp.prompt_text(1, 200, seed=0)
    assert a == cp.prompt_text(0, 200, seed=0)
    assert a.split()[0] != b.split()[0]  # the hash comes first: no shared prefix-cache page
    assert a.split()[1:] == b.split()[1:]
    assert 200 <= len(a.split()) <= 210


def test_workload_sizes_and_no_prompt_repeats_across_levels() -> None:
    cfg = cp.PeerConfig(concurrency=(1, 8), requests=None, warmup=2)
    work = cp.workload(cfg)
    assert [len(work[c][1]) for c in (1, 8)] == [16, 32]
    texts = [it.text for c in (1, 8) for part in work[c] for it in part]
    assert len(texts) == len(set(texts)) == 2 + 16 + 2 + 32
    assert all(it.output_len == cfg.max_tokens for c in (1, 8) for it in work[c][1])


def test_config_refuses_what_cannot_run() -> None:
    with pytest.raises(ValueError, match="--concurrency"):
        cp.PeerConfig(concurrency=(0,))
    with pytest.raises(ValueError, match="--ctx-per-slot"):
        cp.PeerConfig(ctx_per_slot=128)


def test_llama_servers_closing_chunk_is_not_a_token() -> None:
    closed = cp.drop_closing_chunk(
        RequestRecord(0.0, chunk_times=[1.0, 1.1, 1.2, 1.2], end=1.2, output_tokens=3)
    )
    assert closed.chunk_times == [1.0, 1.1, 1.2] and cp.is_verified(closed, 3)
    exact = cp.drop_closing_chunk(RequestRecord(0.0, chunk_times=[1.0, 1.1, 1.2], end=1.2, output_tokens=3))
    assert exact.chunk_times == [1.0, 1.1, 1.2]


def test_verified_needs_both_usage_and_chunk_count() -> None:
    merged = RequestRecord(0.0, chunk_times=[1.0, 1.2], end=1.2, output_tokens=3)  # two tokens in one chunk
    no_usage = RequestRecord(0.0, chunk_times=[1.0, 1.1, 1.2], end=1.2)
    failed = RequestRecord(0.0, error="timeout")
    assert not cp.is_verified(merged, 3) and not cp.is_verified(failed, 3)
    assert not cp.is_verified(no_usage, 3)  # no usage from the server: nothing to check the stream against


def test_ratios_against_llama_f32_with_targets() -> None:
    rows = [make_row("llama-f32", 1, 40.0, 20.0), make_row("pd-colocated", 1, 30.0, 25.0),
            make_row("llama-f32", 16, 100.0, 100.0), make_row("pd-colocated", 16, 160.0, 60.0)]  # fmt: skip
    got = {(r["metric"], r["concurrency"], r["base"]): r for r in peers_report.ratios(rows)}
    itl = got[("itl_p50_ms", 1, "llama-f32")]
    assert itl["ratio"] == pytest.approx(1.25) and itl["met"] is False
    assert got[("output_tok_s", 16, "llama-f32")]["met"] is True
    assert got[("output_tok_s", 64, "llama-f32")]["ratio"] is None  # not measured
    assert got[("output_tok_s", 16, "llama-q4_1")]["met"] is None  # for the record only


def test_markdown_table_has_a_line_per_row() -> None:
    rows = [make_row("llama-f32", 1, 40.0, 20.0), make_row("pd-colocated", 1, 30.0, 25.0)]
    text = peers_report.table(rows)
    assert text.count("\n") == 3 and "| pd-colocated | 1 | 30.0 |" in text


def test_plot_writes_a_png(tmp_path: Path) -> None:
    rows = [make_row("llama-f32", c, 10.0 * c, 20.0) for c in (1, 4)]
    assert "plot:" in peers_report.plot(rows, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0


def test_server_argv_gives_every_slot_its_context() -> None:
    build = peers_llamacpp.LlamaBuild("0.3.36", "abc1234", "version: 1 (abc1234)", (), "cc", None, "/b")
    argv = peers_llamacpp.server_argv(build, Path("m.gguf"), 8080, 64, 512, 2, alias="llama-f32")
    assert argv[0] == "/b/bin/llama-server"
    assert argv[argv.index("-np") + 1] == "64" and argv[argv.index("-c") + 1] == str(64 * 512)
    assert argv[argv.index("-t") + 1] == "2" and "--cont-batching" in argv
