"""`n` choices per request: the samples share the prompt's KV blocks (counted once), each has its
own seed stream, logprobs per choice, usage over all choices, streams with an index per choice;
`best_of` is refused. Engine bookkeeping, then the real server with the `openai` client."""

from __future__ import annotations

import httpx
import pytest

from qwenkit.engine import Engine, EngineSettings, SamplingParams
from qwenkit.server.choices import choice_seed
from test_engine import tiny_model
from test_server import model, server, tokenizer  # noqa: F401  (fixtures)

openai = pytest.importorskip("openai")
USER = [{"role": "user", "content": "Tell me a story about a cat."}]


def test_choices_share_the_prompt_blocks():
    prompt = list(range(3, 53))  # 50 tokens: 6 full blocks of 8, and 2 tokens in a 7th
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=3, ignore_eos=True)
    used = {}
    for shared in (False, True):
        engine = Engine(tiny_model(), EngineSettings(block_size=8, num_blocks=64))
        first = engine.add_request(prompt, params)
        others = [engine.add_request(prompt, params.replace(seed=choice_seed(3, k)), after=first if shared else None)
                  for k in (1, 2)]
        while len(engine.scheduler.running) < 3:
            engine.step()
        seqs = [engine.requests[r][0] for r in (first, *others)]
        used[shared] = engine.blocks.num_used_blocks
        if shared:
            assert all(s.block_table[:6] == seqs[0].block_table[:6] for s in seqs[1:])
            assert [s.num_cached_tokens for s in seqs] == [0, 48, 48]
            assert all(engine.blocks.blocks[b].ref_count == 3 for b in seqs[0].block_table[:6])
            assert len({s.block_table[6] for s in seqs}) == 3  # the partial block is each one's own
        while engine.has_unfinished():
            engine.step()
        assert engine.blocks.num_used_blocks == 0
    assert used == {False: 3 * 7, True: 6 + 3 * 1}


def test_a_follower_waits_for_its_leaders_prompt_and_survives_its_abort():
    engine = Engine(tiny_model(), EngineSettings(block_size=4, num_blocks=64, max_prefill_tokens=8))
    prompt = list(range(3, 23))  # 20 tokens: three prefill steps of 8
    first = engine.add_request(prompt, SamplingParams(max_tokens=4, temperature=0))
    second = engine.add_request(prompt, SamplingParams(max_tokens=4, temperature=0), after=first)
    engine.step()
    assert engine.requests[second][0] not in engine.scheduler.waiting  # held back
    engine.abort(first)  # the leader ends before its prompt is computed: the follower goes on alone
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert [o.num_output_tokens for o in outs if o.finished and o.request_id == second] == [4]


def test_seeded_n_gives_different_reproducible_samples(server):  # noqa: F811
    kw = dict(model="tiny", messages=USER, max_tokens=12, temperature=1.0, seed=11, n=3,
              extra_body={"ignore_eos": True})
    a, b = (server.client.chat.completions.create(**kw) for _ in range(2))
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2] and len(set(texts)) == 3
    assert texts == [c.message.content for c in b.choices]
    one = server.client.chat.completions.create(**{**kw, "n": 1})
    assert one.choices[0].message.content == texts[0]  # choice 0 samples with the request's own seed
    assert a.usage.completion_tokens == 36 and a.usage.prompt_tokens == one.usage.prompt_tokens


def test_logprobs_and_usage_per_choice(server):  # noqa: F811
    r = server.client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6, n=2, temperature=1.0,
                                         seed=5, logprobs=2, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1]
    for c in r.choices:
        assert len(c.logprobs.tokens) == 6
        # each whole token's text is in the reply, in order (special tokens are listed but skipped
        # in the text; a byte token that is part of a character shows as U+FFFD on its own)
        rest = c.text
        for t in c.logprobs.tokens:
            if "\ufffd" not in t and not (t.startswith("<|") and t.endswith("|>")):
                assert t in rest, (t, rest)
                rest = rest[rest.index(t) + len(t):]
        assert all(len(top) <= 2 for top in c.logprobs.top_logprobs)
    assert r.usage.completion_tokens == 12


def test_streamed_choices_carry_their_index(server):  # noqa: F811
    kw = dict(model="tiny", messages=USER, max_tokens=10, temperature=1.0, seed=21, n=3, extra_body={"ignore_eos": True})
    whole = server.client.chat.completions.create(**kw)
    chunks = list(server.client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    texts, reasons = {}, {}
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            reasons[choice.index] = choice.finish_reason or reasons.get(choice.index)
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert reasons == {0: "length", 1: "length", 2: "length"}
    assert chunks[-1].usage.completion_tokens == 30 and not chunks[-1].choices
    text = list(server.client.completions.create(model="tiny", prompt="A cat", max_tokens=5, n=2, temperature=1.0,
                                                 seed=2, stream=True, extra_body={"ignore_eos": True}))
    assert sorted({c.choices[0].index for c in text}) == [0, 1]


def test_server_shares_the_prompt_blocks_between_choices(server):  # noqa: F811
    before = server.wait_idle()
    messages = [{"role": "user", "content": "A prompt no other test sends, long enough for several blocks."}]
    r = server.client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, n=3, temperature=1.0)
    after = server.wait_idle()
    full_block_tokens = (r.usage.prompt_tokens - 1) // 8 * 8
    hits = after["qwenkit_prefix_cache_hits_total"] - before["qwenkit_prefix_cache_hits_total"]
    assert hits == 2 * full_block_tokens  # choices 1 and 2 found choice 0's prompt blocks


def test_best_of_and_bad_n_are_refused(server):  # noqa: F811
    with pytest.raises(openai.BadRequestError, match="best_of"):
        server.client.completions.create(model="tiny", prompt="x", max_tokens=2, n=2, best_of=3)
    with pytest.raises(openai.BadRequestError, match="n must be"):
        server.client.chat.completions.create(model="tiny", messages=USER, max_tokens=2, n=0)


def test_leaving_a_stream_of_n_choices_frees_every_block(server):  # noqa: F811
    server.wait_idle()
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 1000, "n": 3, "stream": True,
            "temperature": 1.0, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        seen = set()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                seen.add(line.split('"index": ')[1][0])
            if len(seen) == 3:
                break
    assert server.wait_idle()["qwenkit_kv_blocks_used"] == 0
