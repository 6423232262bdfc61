"""The engine in its own process over ZMQ: same outputs as the offline API, aborts, errors, death."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import orjson
import pytest

from pd_serve import LLM, SamplingParams
from pd_serve.config import EngineConfig
from pd_serve.engine.client import EngineClient, EngineStartError
from pd_serve.engine.messages import RequestDelta


async def _collect(client: EngineClient, rid: str, prompt: list[int], params: SamplingParams) -> list[RequestDelta]:
    return [d async for d in client.generate(rid, prompt, params, timeout=60)]


def test_engine_process_matches_offline_and_cleans_up(demo_dir: Path) -> None:
    config = EngineConfig(model=str(demo_dir), max_total_tokens=4096, show_progress=False)
    prompts = [[11, 12, 13, 14], list(range(20, 60)), [99] * 9]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    offline = LLM(config=config).generate(prompts, params)

    async def main() -> None:
        client = EngineClient(config)
        info = await client.start(timeout=120)
        assert info.layout.page_size == 16
        try:
            results = await asyncio.gather(*(_collect(client, f"r{i}", p, params) for i, p in enumerate(prompts)))
            for deltas, expected in zip(results, offline):
                assert deltas[-1].finished and deltas[-1].finish_reason == "length"
                assert [t for d in deltas for t in d.new_token_ids] == expected.token_ids
                assert "".join(d.new_text for d in deltas) == expected.text
            # a consumer that leaves early aborts its request: pages come back
            gen = client.generate("early", prompts[1], SamplingParams(max_tokens=200, ignore_eos=True))
            await gen.__anext__()
            await gen.aclose()
            idle = None
            for _ in range(100):
                stats = await client.stats()
                if stats.num_running == 0 and stats.num_waiting == 0:
                    idle = stats
                    break
                await asyncio.sleep(0.05)
            assert idle is not None and idle.num_free_pages == idle.num_total_pages
            # a request the engine refuses comes back finished with the reason and the field
            bad = await _collect(client, "bad", [5] * 10, SamplingParams(max_tokens=5000))
            assert bad[-1].finish_reason == "abort" and bad[-1].error_param == "max_tokens"
            assert "--max-model-len" in (bad[-1].error or "")
            assert client.alive
            # a message the engine cannot decode fails its request, not the engine
            queue: asyncio.Queue[RequestDelta] = asyncio.Queue()
            client._queues["garbled"] = queue
            await client._in.send(orjson.dumps({"type": "AddRequest", "body": {"request_id": "garbled", "sampling": 7}}))
            await client._in.send(b"not json at all")
            garbled = await asyncio.wait_for(queue.get(), 10)
            assert garbled.finished and "could not decode" in (garbled.error or "")
            again = await _collect(client, "after", prompts[0], params)
            assert [t for d in again for t in d.new_token_ids] == offline[0].token_ids
            assert client.alive
            # kill -9 of the engine: open requests end with an error, alive turns false
            pending = asyncio.ensure_future(_collect(client, "doomed", prompts[0], SamplingParams(max_tokens=2000, ignore_eos=True)))
            await asyncio.sleep(0.2)
            assert client.pid is not None
            os.kill(client.pid, signal.SIGKILL)
            deltas = await asyncio.wait_for(pending, 10)
            assert deltas[-1].finished and deltas[-1].error
            await asyncio.sleep(0.5)
            assert not client.alive
        finally:
            await client.shutdown()

    asyncio.run(main())


def test_engine_start_failure_is_reported(tmp_path: Path) -> None:
    async def main() -> None:
        client = EngineClient(EngineConfig(model=str(tmp_path / "missing"), show_progress=False))
        with pytest.raises(EngineStartError, match="config.json"):
            await client.start(timeout=120)

    asyncio.run(main())
