"""Speculative decoding in the batching engine and the server: a request's guesses (prompt lookup)
run as extra one-token rows of the decode call beside plain requests; greedy output equals plain
decoding, the blocks only rejected guesses reached go back to the pool, no rejected guess is ever
findable in the prefix cache, and /metrics counts drafts under vLLM's names."""

from __future__ import annotations

import pytest

import qwenkit
from qwenkit.engine import Engine, EngineSettings, SamplingParams
from qwenkit.engine.block_manager import BlockManager, block_hash
from qwenkit.engine.sampling_params import SpeculativeParams
from qwenkit.engine.sequence import Sequence
from qwenkit.errors import RequestError
from test_engine import random_prompts, tiny_model

NGRAM = SpeculativeParams(num_speculative_tokens=4)


@pytest.fixture(scope="module")
def model():
    m = tiny_model(vocab_size=32)  # small enough a vocabulary that its greedy output repeats itself
    m.eos_token_ids = []
    return m


def run(engine: Engine, requests: list[tuple[list[int], SamplingParams]], check=None) -> dict[str, list[int]]:
    """Add every request, step until all finish (calling check(engine) after each step)."""
    out = {}
    for i, (prompt, params) in enumerate(requests):
        out[engine.add_request(prompt, params, request_id=str(i))] = []
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id] += o.token_ids
        if check:
            check(engine)
    return out


def settings(**changes) -> EngineSettings:
    return EngineSettings(**{**dict(block_size=4, num_blocks=200, max_prefill_tokens=16), **changes})


def test_mixed_batch_equals_plain_decoding_and_each_alone(model):
    prompts = random_prompts(8, 3, 30, 32, seed=3)
    refs = [qwenkit.generate(model, p, 40) for p in prompts]
    model.eos_token_ids = [refs[0][12]]  # a token some requests produce: several stop inside a run
    refs = [qwenkit.generate(model, p, 40) for p in prompts]
    spec, plain = SamplingParams(max_tokens=40, temperature=0, speculative=NGRAM), SamplingParams(max_tokens=40, temperature=0)
    try:
        mixed = Engine(model, settings())
        out = run(mixed, [(p, spec if i % 2 else plain) for i, p in enumerate(prompts)])
        assert [out[str(i)] for i in range(len(prompts))] == refs
        m = mixed.metrics()
        assert m["spec_drafts"] > 5 and m["spec_accepted_tokens"] > 5  # guesses were made and kept
        assert m["steps"] < sum(map(len, refs))  # and some steps brought a request several tokens
        for i, p in enumerate(prompts[1::2]):  # each speculative request alone
            assert run(Engine(model, settings()), [(p, spec)])["0"] == refs[2 * i + 1]
    finally:
        model.eos_token_ids = []


def test_rejected_guesses_return_their_blocks_and_are_never_hashed(model):
    prompts = random_prompts(5, 3, 20, 32, seed=5)
    params = SamplingParams(max_tokens=48, temperature=0, speculative=SpeculativeParams(num_speculative_tokens=7))
    engine = Engine(model, settings(num_blocks=120))

    def blocks_match_tokens(engine):
        for seq in engine.scheduler.running:  # after a step, a sequence holds no block past its tokens
            assert len(seq.block_table) <= engine.blocks.blocks_for(len(seq))
    out = run(engine, [(p, params) for p in prompts], blocks_match_tokens)
    assert engine.metrics()["spec_draft_tokens"] > engine.metrics()["spec_accepted_tokens"] > 0
    assert engine.blocks.num_used_blocks == 0
    real = set()  # the hash of every full block of every request's real tokens
    for i, p in enumerate(prompts):
        tokens, prev = p + out[str(i)], None
        for b in range(len(tokens) // 4):
            prev = block_hash(prev, tokens[4 * b:4 * b + 4])
            real.add(prev)
    assert engine.blocks.hash_to_block and set(engine.blocks.hash_to_block) <= real


def test_trim_slots_returns_blocks_past_the_kept_tokens():
    blocks = BlockManager(num_blocks=10, block_size=4)
    seq = Sequence(list(range(6)), SamplingParams())
    blocks.allocate(seq)
    assert (len(seq.block_table), blocks.num_free_blocks) == (2, 8)
    blocks.append_slots(seq, extra=7)  # room for 7 guesses: positions up to 12
    assert (len(seq.block_table), blocks.num_free_blocks) == (4, 6)
    seq.token_ids += [6, 7]  # one guess kept, one token of the target's
    blocks.trim_slots(seq)
    assert (len(seq.block_table), blocks.num_free_blocks) == (2, 8)
    assert list(blocks.free)[:2] == [2, 3]  # the returned blocks are handed out first
    blocks.free_seq(seq)
    assert blocks.num_free_blocks == 10


def test_seeded_sampling_is_batch_independent(model):
    prompt = random_prompts(1, 10, 11, 32, seed=9)[0]
    params = SamplingParams(max_tokens=30, temperature=0.8, top_k=8, seed=7, speculative=NGRAM)
    alone = run(Engine(model, settings()), [(prompt, params)])["0"]
    others = [(p, SamplingParams(max_tokens=30, temperature=0)) for p in random_prompts(3, 3, 20, 32, seed=4)]
    assert run(Engine(model, settings()), [(prompt, params), *others])["0"] == alone
    assert len(alone) == 30


def test_refused_combinations_name_the_field(model):
    with pytest.raises(RequestError, match="num_speculative_tokens"):
        SpeculativeParams(num_speculative_tokens=0)
    with pytest.raises(RequestError, match="speculative.method"):
        SpeculativeParams(method="draft")
    with pytest.raises(RequestError, match="structured outputs"):
        SamplingParams(speculative=NGRAM, thinking_budget=10)


def test_engine_default_applies_to_requests_that_set_none(model):
    prompts = random_prompts(3, 3, 20, 32, seed=6)
    refs = [qwenkit.generate(model, p, 30) for p in prompts]
    engine = Engine(model, settings(speculative=NGRAM))
    out = run(engine, [(p, SamplingParams(max_tokens=30, temperature=0)) for p in prompts])
    assert [out[str(i)] for i in range(3)] == refs
    assert engine.metrics()["spec_drafts"] > 0


# -- the server, with the real openai client ------------------------------------------------------

@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    pytest.importorskip("openai")
    from test_server import Server, write_tokenizer

    tokenizer = qwenkit.load_tokenizer(write_tokenizer(tmp_path_factory.mktemp("tok")))
    s = Server(model, tokenizer, settings(block_size=8))
    yield s
    s.close()


def test_server_request_field_counts_drafts_in_metrics(server, model):
    import openai

    prompts = random_prompts(3, 5, 20, 32, seed=8)
    spec = {"speculative": {"method": "ngram", "num_speculative_tokens": 4}}
    before = server.metrics()
    for p in prompts:
        plain = server.client.completions.create(model="tiny", prompt=p, max_tokens=32, temperature=0)
        fast = server.client.completions.create(model="tiny", prompt=p, max_tokens=32, temperature=0, extra_body=spec)
        assert fast.choices[0].text == plain.choices[0].text
        assert fast.usage.completion_tokens == plain.usage.completion_tokens == 32
        chunks = server.client.completions.create(model="tiny", prompt=p, max_tokens=32, temperature=0, stream=True,
                                                  extra_body=spec)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    m = server.wait_idle()
    labels = '{model_name="tiny",engine="0"}'
    drafts = m["vllm:spec_decode_num_drafts_total" + labels] - before["vllm:spec_decode_num_drafts_total" + labels]
    accepted = m["vllm:spec_decode_num_accepted_tokens_total" + labels]
    assert drafts > 0 and m["vllm:spec_decode_num_draft_tokens_total" + labels] >= accepted > 0
    assert m['vllm:spec_decode_num_accepted_tokens_per_pos_total{model_name="tiny",engine="0",position="0"}'] > 0
    assert 0 < m["qwenkit_spec_decode_acceptance_rate"] <= 1
    assert m["qwenkit_kv_blocks_used"] == 0
    for bad, field in (({"num_speculative_tokens": 0}, "num_speculative_tokens"), ({"method": "eagle"}, "method"),
                       ({"num_guesses": 3}, "num_guesses")):
        with pytest.raises(openai.BadRequestError, match=field):
            server.client.completions.create(model="tiny", prompt=prompts[0], max_tokens=4,
                                             extra_body={"speculative": bad})


def test_serve_flags_set_the_engine_default():
    from qwenkit.errors import ConfigError
    from qwenkit.server.command import checked_flags, engine_settings, parser

    args = parser("qwenkit serve").parse_args(["--speculative", "ngram", "--num-speculative-tokens", "3"])
    assert engine_settings(args).speculative == SpeculativeParams(num_speculative_tokens=3)
    assert engine_settings(parser("qwenkit serve").parse_args([])).speculative is None
    args.num_speculative_tokens = 99
    with pytest.raises(ConfigError, match="--num-speculative-tokens 99"):
        checked_flags(args)
