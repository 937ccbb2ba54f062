"""A request's `n` choices: n engine requests over one prompt, answered as one reply.

Choice 0 samples with the request's seed (so `n=1` and the first of `n=3` agree); choice k > 0
with a seed derived from (seed, k), so a seeded request gives n different samples, the same
ones every time. Choices 1.. are submitted `after` choice 0: they wait until its prompt is
computed and then share its K/V blocks through the prefix cache (the prompt is stored once).
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import AsyncIterator

from ..engine.async_engine import AsyncEngine, RequestStream
from ..engine.sampling_params import SamplingParams


def choice_seed(seed: int | None, k: int) -> int | None:
    """The seed of choice k: the request's own for k = 0, else one derived from both (in [0, 2**63))."""
    if seed is None or k == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}:{k}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def submit(engine: AsyncEngine, prompt_ids: list[int], params: SamplingParams, n: int,
           adapter: str | None = None) -> list[RequestStream]:
    """n requests over the prompt, all through LoRA adapter `adapter` (None: the base model)."""
    first = engine.submit(prompt_ids, params, adapter=adapter)
    return [first] + [engine.submit(prompt_ids, params.replace(seed=choice_seed(params.seed, k)),
                                    after=first.request_id, adapter=adapter) for k in range(1, n)]


async def merged(generators: list[AsyncIterator]) -> AsyncIterator:
    """Items of several async iterators as they come; leaving early cancels the rest."""
    if len(generators) == 1:
        async for item in generators[0]:
            yield item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(gen):
        try:
            async for item in gen:
                await queue.put(item)
        finally:
            await queue.put(done)

    tasks = [asyncio.ensure_future(pump(g)) for g in generators]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
