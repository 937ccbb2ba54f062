"""A bounded load test: 64 concurrent streaming requests against the real server on a tiny model,
with a KV budget small enough to force preemption. Every request must finish, with exactly
the text it gets alone, no error, and every block back in the pool."""

from __future__ import annotations

import asyncio

import pytest
import torch

import qwenkit
from qwenkit.engine import EngineSettings
from test_server import Server, model, tokenizer  # noqa: F401  (fixtures)

openai = pytest.importorskip("openai")

N_REQUESTS, MAX_TOKENS, TIME_LIMIT_S = 64, 16, 240


@pytest.fixture(scope="module")
def busy_server(model, tokenizer):  # noqa: F811
    s = Server(model, tokenizer, EngineSettings(block_size=4, num_blocks=160, max_num_seqs=32, max_prefill_tokens=64))
    yield s
    s.close()


async def stream_one(client, prompt: list[int]) -> tuple[str, str | None]:
    stream = await client.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                             stream=True)
    text, reason = [], None
    async for chunk in stream:
        text.append(chunk.choices[0].text)
        reason = chunk.choices[0].finish_reason or reason
    return "".join(text), reason


async def run_all(url: str, prompts) -> list:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=TIME_LIMIT_S)
    try:
        return await asyncio.wait_for(asyncio.gather(*(stream_one(client, p) for p in prompts)), TIME_LIMIT_S)
    finally:
        await client.close()


def test_64_concurrent_streams_complete_correctly_and_free_all_blocks(busy_server, model, tokenizer):  # noqa: F811
    g = torch.Generator().manual_seed(11)
    shared = torch.randint(0, 256, (24,), generator=g).tolist()
    prompts = [(shared if i % 2 else []) + torch.randint(0, 256, (int(torch.randint(1, 40, (1,), generator=g)),),
                                                         generator=g).tolist() for i in range(N_REQUESTS)]
    expected = [tokenizer.decode(qwenkit.generate(model, p, MAX_TOKENS), skip_special_tokens=True) for p in prompts]
    results = asyncio.run(run_all(busy_server.url, prompts))
    assert [text for text, _ in results] == expected
    assert all(reason in ("stop", "length") for _, reason in results)
    m = busy_server.wait_idle()
    assert m["qwenkit_kv_blocks_used"] == 0 and m["qwenkit_kv_blocks_free"] == 160
    assert m["qwenkit_requests_finished_total"] == N_REQUESTS and m["qwenkit_requests_aborted_total"] == 0
    assert m["qwenkit_preemptions_total"] > 0 and m["qwenkit_prefix_cache_hits_total"] > 0
