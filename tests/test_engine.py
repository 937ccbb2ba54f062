"""The batching engine against the plain reference: greedy output of every request equals
`qwenkit.generate` on that request alone, whatever it was batched with, chunked, preempted or
served from the prefix cache."""

from __future__ import annotations

import pytest
import torch

import qwenkit
from qwenkit.engine import LLM, Engine, EngineSettings, SamplingParams
from qwenkit.errors import RequestError
from tiny import randomize


def tiny_model(vocab_size: int = 256, seed: int = 0, **overrides) -> qwenkit.QwenForCausalLM:
    """A random fp32 model small enough to run dozens of requests in a second or two."""
    spec = dict(model_type="qwen2", vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=512, tie_word_embeddings=False)
    model = qwenkit.build_model(qwenkit.QwenConfig.from_dict({**spec, **overrides}), torch.float32)
    randomize(model, seed)
    return model.eval()


def random_prompts(n: int, lo: int, hi: int, vocab: int, seed: int = 1, prefix: list[int] = ()) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [list(prefix) + torch.randint(0, vocab, (k,), generator=g).tolist() for k in lengths]


def run_staggered(engine: Engine, prompts, params, arrive_every: int = 3) -> dict[str, list[int]]:
    """Add request i at step i * arrive_every; run until all finish; token ids per request id."""
    out, pending, step = {}, list(enumerate(prompts)), 0
    while pending or engine.has_unfinished():
        while pending and pending[0][0] * arrive_every <= step:
            i, prompt = pending.pop(0)
            engine.add_request(prompt, params, request_id=str(i))
            out[str(i)] = []
        for o in engine.step():
            out[o.request_id] += o.token_ids
        step += 1
    return out


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_greedy_matches_generate_with_preemption_chunking_and_prefix_hits(model):
    system = random_prompts(1, 12, 13, 256, seed=7)[0]  # three shared blocks of 4
    prompts = random_prompts(10, 1, 40, 256, seed=1) + random_prompts(8, 1, 30, 256, seed=2, prefix=system)
    prompts.insert(3, random_prompts(1, 70, 71, 256, seed=3)[0])  # longer than a prefill chunk
    model.eos_token_ids = []
    refs = [qwenkit.generate(model, p, 24) for p in prompts]
    eos = refs[0][10]  # a token some requests produce, so several stop early
    model.eos_token_ids = [eos]
    refs = [qwenkit.generate(model, p, 24) for p in prompts]
    settings = EngineSettings(block_size=4, num_blocks=40, max_prefill_tokens=16, max_num_seqs=6)
    engine = Engine(model, settings)
    got = run_staggered(engine, prompts, SamplingParams(temperature=0, max_tokens=24))
    assert [got[str(i)] for i in range(len(prompts))] == refs
    m = engine.metrics()
    assert m["preemptions"] > 0 and m["prefix_cache_hit_tokens"] >= 12 * 4
    assert any(r[-1] == eos for r in refs) and m["kv_blocks_free"] == m["kv_blocks_total"]


def test_all_at_once_any_order_matches_generate(model):
    model.eos_token_ids = []
    prompts = random_prompts(16, 1, 50, 256, seed=4)
    refs = [qwenkit.generate(model, p, 12) for p in prompts]
    llm = LLM(model, settings=EngineSettings(block_size=8, num_blocks=200, max_prefill_tokens=64))
    outs = llm.generate(prompts[::-1], SamplingParams(temperature=0, max_tokens=12))
    assert [o.token_ids for o in outs[::-1]] == refs
    assert all(o.finish_reason == "length" for o in outs)


def test_sliding_window_and_qwen3_match_generate():
    for overrides in (dict(use_sliding_window=True, sliding_window=6, max_window_layers=1),
                      dict(model_type="qwen3", head_dim=16)):
        m = tiny_model(seed=3, **overrides)
        m.eos_token_ids = []
        prompts = random_prompts(5, 3, 30, 256, seed=5)
        refs = [qwenkit.generate(m, p, 10) for p in prompts]
        engine = Engine(m, EngineSettings(block_size=4, num_blocks=64, max_prefill_tokens=8))
        got = run_staggered(engine, prompts, SamplingParams(temperature=0, max_tokens=10), arrive_every=2)
        assert [got[str(i)] for i in range(len(prompts))] == refs, overrides


def test_shared_system_prompt_is_prefilled_once(model):
    system = random_prompts(1, 32, 33, 256, seed=9)[0]
    engine = Engine(model, EngineSettings(block_size=8, num_blocks=64))
    llm_params = SamplingParams(temperature=0, max_tokens=2)
    engine.add_request(system + [1, 2, 3], llm_params)
    while engine.has_unfinished():
        engine.step()
    engine.add_request(system + [4, 5], llm_params)
    engine.step()
    assert engine.blocks.prefix_hit_tokens == 32


def test_seeded_sampling_is_independent_of_batch(model):
    model.eos_token_ids = []
    llm = LLM(model, settings=EngineSettings(num_blocks=100))
    p = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=123, max_tokens=16)
    alone = llm.generate([[5, 6, 7]], p)[0].token_ids
    batched = llm.generate([[1, 2], [5, 6, 7], [9] * 20], [SamplingParams(max_tokens=16), p, p.replace(seed=5)])
    assert batched[1].token_ids == alone


def test_seeded_sampling_matches_generate(model):
    """One sampler: a seeded sampled request gets the same tokens from generate as from the engine."""
    model.eos_token_ids = []
    prompt = [5, 6, 7]
    ref = qwenkit.generate(model, prompt, 16, temperature=0.8, top_k=50, top_p=0.9, seed=123)
    p = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=123, max_tokens=16)
    assert LLM(model, settings=EngineSettings(num_blocks=100)).generate([prompt], p)[0].token_ids == ref
    assert ref != qwenkit.generate(model, prompt, 16)  # it did sample


def test_abort_frees_blocks(model):
    engine = Engine(model, EngineSettings(block_size=4, num_blocks=32))
    rid = engine.add_request(list(range(30)), SamplingParams(max_tokens=50))
    engine.step()
    assert engine.blocks.num_free_blocks < 32
    out = engine.abort(rid)
    assert out.finished and out.finish_reason == "abort"
    assert engine.blocks.num_free_blocks == 32 and not engine.has_unfinished()


@pytest.mark.parametrize("prompt,params,match", [
    ([], SamplingParams(), "empty"),
    ([300], SamplingParams(), "token ids"),
    (list(range(200)) * 3, SamplingParams(), "context"),
    ([1, 2], SamplingParams(max_tokens=600), "max_tokens"),
    ([1, 2], SamplingParams(logit_bias={999: 1.0}), "logit_bias"),
    ([1, 2], SamplingParams(stop=("x",)), "tokenizer"),
])
def test_bad_requests_raise_request_error(model, prompt, params, match):
    engine = Engine(model, EngineSettings(num_blocks=64))
    with pytest.raises(RequestError, match=match):
        engine.add_request(prompt, params)


@pytest.mark.parametrize("bad,match", [
    (dict(temperature=float("nan")), "temperature"), (dict(temperature=-0.5), "temperature"),
    (dict(top_k=-2), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(seed=2**64), "seed"), (dict(max_new_tokens=0), "max_tokens"),
])
def test_generate_refuses_what_the_engine_refuses(model, bad, match):
    with pytest.raises(RequestError, match=match):
        qwenkit.generate(model, [1, 2], **{"max_new_tokens": 4, **bad})


def test_kv_budget_sets_block_count(model):
    per_block = 2 * 2 * 16 * 2 * 16 * 4  # k+v, layers, slots, kv heads, head dim, fp32
    engine = Engine(model, EngineSettings(kv_cache_memory=10 * per_block, max_num_seqs=1000))
    assert engine.blocks.num_blocks == 10 and engine.num_context_tokens == 160


def test_full_kv_budget_makes_the_next_request_wait_without_allocating(model):
    """Fill the budget exactly: the next request waits (not admitted, nothing allocated), runs once
    blocks return, and still equals generate alone; a request bigger than the whole budget is refused."""
    model.eos_token_ids = []
    per_block = 2 * 2 * 16 * 2 * 16 * 4
    engine = Engine(model, EngineSettings(kv_cache_memory=10 * per_block, max_num_seqs=8))
    cache_bytes = sum(t.nbytes for t in (engine.runner.cache.k, engine.runner.cache.v))
    assert cache_bytes == 10 * per_block
    first, second = list(range(1, 150)), list(range(7, 40))  # first needs all 10 blocks by its end
    params = SamplingParams(temperature=0, max_tokens=10)
    out = {engine.add_request(first, params, "first"): [], engine.add_request(second, params, "second"): []}
    waited = False
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id] += o.token_ids
        if not engine.blocks.num_free_blocks:
            waited |= [s.request_id for s in engine.scheduler.waiting] == ["second"]
        assert sum(t.nbytes for t in (engine.runner.cache.k, engine.runner.cache.v)) == cache_bytes
    assert waited and engine.blocks.num_free_blocks == 10
    for rid, prompt in (("first", first), ("second", second)):
        assert out[rid] == qwenkit.generate(model, prompt, max_new_tokens=10)
    with pytest.raises(RequestError, match="KV cache"):
        engine.add_request(list(range(1, 150)), SamplingParams(max_tokens=20))
