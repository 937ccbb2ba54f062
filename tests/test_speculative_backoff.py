"""Speculative back-off in the batching engine: a request whose guesses are never kept stops
proposing after a few steps and probes with one guess every PROBE_EVERY steps; a request whose
guesses are always kept proposes its full count every step; mixed with plain requests each one's
tokens are still its own alone; a seeded request's tokens do not depend on its batch; and the
cost model backs off sooner in a fuller batch. Proposals are counted through the engine's
spec_decode counters (what /metrics reports)."""

from __future__ import annotations

import pytest
import torch

import qwenkit
from qwenkit.engine import Engine, SamplingParams
from qwenkit.engine.sampling_params import SpeculativeParams
from qwenkit.speculative.lookahead import PROBE_EVERY, Lookahead
from test_engine import random_prompts, tiny_model
from test_speculative_engine import run, settings

V = 32
# Every token looked up alone (prompt_lookup_min 1), so a guess is made at every step.
UNIGRAM = SpeculativeParams(num_speculative_tokens=4, prompt_lookup_min=1)
NEVER = [3 * i % V for i in range(V)]  # each token once, followed by t + 3: the counter never goes there
ALWAYS = list(range(V)) + list(range(10))  # the counter's own path: every guess is its next token


@pytest.fixture(scope="module")
def counter():
    """A model whose greedy next token is (last token + 1) mod V: its layers add nothing to the
    residual (o_proj, down_proj zero), the embedding is one-hot and lm_head maps t to t + 1."""
    m = tiny_model(vocab_size=V)
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        m.model.embed_tokens.weight.zero_()
        m.model.embed_tokens.weight[:, :V] = torch.eye(V)
        m.model.norm.weight.fill_(1.0)
        m.lm_head.weight.zero_()
        m.lm_head.weight[:, :V] = torch.eye(V).roll(1, dims=0)  # row t + 1 reads dimension t
    m.eos_token_ids = []
    return m


def drafts_per_step(engine: Engine, prompt: list[int], params: SamplingParams) -> tuple[list[int], list[int]]:
    """Run one request alone: (its tokens, the guessed tokens each decode step carried)."""
    engine.add_request(prompt, params, request_id="0")
    tokens, per_step = [], []
    while engine.has_unfinished():
        decoding, before = bool(tokens), engine.metrics()["spec_draft_tokens"]
        for o in engine.step():
            tokens += o.token_ids
        if decoding:  # not a prompt chunk
            per_step.append(engine.metrics()["spec_draft_tokens"] - before)
    return tokens, per_step


def test_counter_model_counts(counter):
    assert qwenkit.generate(counter, NEVER, 5) == [30, 31, 0, 1, 2]


def test_never_kept_guesses_back_off_then_probe(counter):
    params = SamplingParams(max_tokens=V - 1, temperature=0, speculative=UNIGRAM)
    engine = Engine(counter, settings())
    tokens, per_step = drafts_per_step(engine, NEVER, params)
    assert tokens == qwenkit.generate(counter, NEVER, V - 1)
    m = engine.metrics()
    assert m["spec_accepted_tokens"] == 0 and m["spec_draft_tokens"] > 0
    stopped = per_step.index(0)  # backed off after a few rejected drafts
    assert 1 <= stopped <= 8 and all(per_step[:stopped])
    probes = [i for i in range(stopped, len(per_step)) if per_step[i]]
    assert len(probes) >= 2 and all(per_step[i] == 1 for i in probes)  # one guess each
    gaps = [b - a for a, b in zip([stopped - 1] + probes, probes)]
    assert gaps == [PROBE_EVERY] * len(probes)
    assert sum(per_step) < len(per_step)  # without back-off: 4 guesses a step


def test_always_kept_guesses_keep_proposing(counter):
    params = SamplingParams(max_tokens=40, temperature=0, speculative=UNIGRAM)
    engine = Engine(counter, settings())
    tokens, per_step = drafts_per_step(engine, ALWAYS, params)
    assert tokens == qwenkit.generate(counter, ALWAYS, 40)
    m = engine.metrics()
    assert m["spec_accepted_tokens"] == m["spec_draft_tokens"] == 40 - 1 - len(per_step)  # the first token is the prompt step's
    assert all(per_step[:-1])  # a draft every step (the last may have no room for one)
    assert max(per_step) == 4 and len(per_step) <= 40 // 3


def test_mixed_batch_backs_off_per_request_and_keeps_each_alone(counter):
    plain = SamplingParams(max_tokens=V - 1, temperature=0)
    spec = plain.replace(speculative=UNIGRAM)
    requests = [(NEVER, spec), (ALWAYS, spec), (NEVER, plain), (ALWAYS[5:], plain)]
    engine = Engine(counter, settings())
    out = run(engine, requests)
    assert [out[str(i)] for i in range(4)] == [qwenkit.generate(counter, p, V - 1) for p, _ in requests]
    m = engine.metrics()
    rejected = m["spec_draft_tokens"] - m["spec_accepted_tokens"]  # all the first request's guesses
    assert 0 < rejected < V - 1
    assert m["spec_accepted_tokens"] >= (V - 1) * 2 // 3  # the second one's guesses, kept


def test_random_model_mixed_batch_equals_each_alone():
    model = tiny_model(vocab_size=V, seed=4)
    model.eos_token_ids = []
    prompts = random_prompts(6, 3, 30, V, seed=11)
    spec = SamplingParams(max_tokens=48, temperature=0, speculative=SpeculativeParams(num_speculative_tokens=6))
    plain = SamplingParams(max_tokens=48, temperature=0)
    out = run(Engine(model, settings()), [(p, spec if i % 3 else plain) for i, p in enumerate(prompts)])
    assert [out[str(i)] for i in range(len(prompts))] == [qwenkit.generate(model, p, 48) for p in prompts]


def test_seeded_request_backs_off_as_if_alone(counter):
    params = SamplingParams(max_tokens=V - 1, temperature=4.0, seed=3, speculative=UNIGRAM)
    alone = run(Engine(counter, settings()), [(NEVER, params)])["0"]
    others = [(ALWAYS, SamplingParams(max_tokens=V - 1, temperature=0)) for _ in range(5)]
    assert run(Engine(counter, settings()), [(NEVER, params), *others])["0"] == alone


def test_fuller_batch_backs_off_sooner():
    look = Lookahead(most=4, rate=0.5)
    assert look.k(others=0) >= 1  # alone, half the guesses kept pays
    assert look.k(others=7) == 0  # beside 7 rows, each row already brings a token
    assert Lookahead(most=4, rate=0.99).k(others=7) == 4  # nearly all kept pays at any batch
