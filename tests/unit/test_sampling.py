"""Sampler (batched, seeded, penalties, logprobs) and incremental detokenizer (UTF-8, stop strings)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pd_serve import LLM, SamplingParams
from pd_serve.engine.detokenizer import IncrementalDetokenizer
from pd_serve.engine.request import Request
from pd_serve.engine.sampler import Sampler
from pd_serve.engine.sampling_params import InvalidParameter


def _reqs(params: list[SamplingParams]) -> list[Request]:
    return [Request(f"r{i}", [1, 2, 3], p) for i, p in enumerate(params)]


def test_greedy_and_top_k_1_pick_the_argmax() -> None:
    logits = torch.randn(4, 50)
    reqs = _reqs([SamplingParams(temperature=0), SamplingParams(top_k=1), SamplingParams(temperature=0.7, top_k=1),
                  SamplingParams(top_p=1e-6)])
    out = Sampler(torch.device("cpu")).sample(logits, reqs)
    assert out.token_ids == logits.argmax(-1).tolist()


def test_seeded_rows_repeat_whatever_the_batch() -> None:
    logits = torch.randn(3, 200)
    s = Sampler(torch.device("cpu"))
    p = SamplingParams(temperature=1.0, seed=42)
    single, batch = _reqs([p]), _reqs([SamplingParams(), p, SamplingParams(top_p=0.5)])
    alone = [s.sample(logits[1:2], single).token_ids[0] for _ in range(8)]
    batched = [s.sample(logits, batch).token_ids[1] for _ in range(8)]
    assert alone == batched
    assert len(set(alone)) > 1  # the generator advances: not the same draw every step


def test_skip_draw_keeps_a_seeded_request_in_step_with_one_that_sampled() -> None:
    """A decode node commits the first token the prefill node sampled, then samples on: its
    generator must be where the prefill node's was after that first draw."""
    logits = torch.randn(1, 200)
    s = Sampler(torch.device("cpu"))
    p = SamplingParams(temperature=1.0, seed=7)
    here, elsewhere = _reqs([p]), _reqs([p])
    s.sample(logits, here)
    Sampler.skip_draw(elsewhere[0], vocab_size=200)
    assert [s.sample(logits, here).token_ids[0] for _ in range(8)] == [
        s.sample(logits, elsewhere).token_ids[0] for _ in range(8)
    ]


def test_sampling_follows_the_distribution() -> None:
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1, 0.0]]))
    s = Sampler(torch.device("cpu"))
    counts = torch.zeros(4)
    r = _reqs([SamplingParams(seed=3)])
    for _ in range(2000):
        counts[s.sample(logits, r).token_ids[0]] += 1
    assert counts[3] == 0
    assert abs(counts[0] / 2000 - 0.7) < 0.05


def test_top_p_and_min_p_cut_the_tail() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2, 1)
    s = Sampler(torch.device("cpu"))
    seen: set[int] = set()
    reqs = _reqs([SamplingParams(top_p=0.75, seed=1), SamplingParams(min_p=0.5, seed=2)])
    for _ in range(300):
        seen |= set(s.sample(logits, reqs).token_ids)
    assert seen == {0, 1}


def test_penalties_discourage_repeats() -> None:
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    r = Request("r", [2], SamplingParams(temperature=0, presence_penalty=1.0))
    r.output_token_ids = [0]
    assert Sampler(torch.device("cpu")).sample(logits, [r]).token_ids == [1]
    r2 = Request("r", [0], SamplingParams(temperature=0, repetition_penalty=1.5))
    assert Sampler(torch.device("cpu")).sample(logits, [r2]).token_ids == [1]


def test_logprobs_are_raw_log_softmax_with_top_alternatives() -> None:
    logits = torch.randn(2, 30)
    reqs = _reqs([SamplingParams(temperature=0, logprobs=3), SamplingParams(temperature=0)])
    out = Sampler(torch.device("cpu")).sample(logits, reqs)
    lp = out.logprobs[0]
    assert lp is not None and out.logprobs[1] is None
    expected = torch.log_softmax(logits[0], -1)
    assert lp.logprob == pytest.approx(expected.max().item(), abs=1e-5)
    assert [t for t, _ in lp.top] == expected.topk(3).indices.tolist()


@pytest.mark.parametrize(
    "field,value", [("max_tokens", 0), ("temperature", -1), ("top_p", 0), ("top_p", 1.5), ("top_k", 0), ("logprobs", 21)]
)
def test_invalid_parameters_name_the_field(field: str, value: float) -> None:
    with pytest.raises(InvalidParameter) as e:
        SamplingParams(**{field: value})
    assert e.value.param == field


class _ByteTokenizer:
    """Token i < 256 is byte i; decoding replaces incomplete UTF-8 with U+FFFD, like real tokenizers."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def _stream(text: str, stop: tuple[str, ...] = ()) -> tuple[list[str], str | None]:
    d = IncrementalDetokenizer(_ByteTokenizer().decode, [72, 105], stop, True)
    deltas, hit = [], None
    for b in text.encode():
        hit = d.add(b)
        if hit is not None:
            break
        deltas.append(d.release(finished=False))
    deltas.append(d.release(finished=True))
    return deltas, hit


def test_multibyte_characters_split_over_tokens_come_out_whole() -> None:
    deltas, _ = _stream("héllo, 世界 🙂!")
    assert "".join(deltas) == "héllo, 世界 🙂!"
    assert all("\ufffd" not in d for d in deltas)


def test_stop_string_across_tokens_is_cut_and_never_streamed() -> None:
    deltas, hit = _stream("one two STOP three", stop=("STOP", "xyz"))
    assert hit == "STOP"
    assert "".join(deltas) == "one two "
    assert all("S" not in d for d in deltas)


def test_engine_stop_string_and_seed_end_to_end(demo_dir: Path) -> None:
    llm = LLM(model=str(demo_dir), show_progress=False, max_total_tokens=2048)
    free = llm.generate(["The scheduler"], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    assert len(free.text) > 4
    stop = free.text[2:4]
    cut = llm.generate(["The scheduler"], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=(stop,)))[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == free.text[: free.text.index(stop)]
    seeded = SamplingParams(max_tokens=16, temperature=0.9, seed=7, ignore_eos=True)
    a = llm.generate(["a", "The scheduler"], [SamplingParams(max_tokens=5), seeded])[1]
    b = llm.generate(["The scheduler"], seeded)[0]
    assert a.token_ids == b.token_ids
