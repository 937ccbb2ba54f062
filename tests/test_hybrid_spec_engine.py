"""Speculative decoding in the batching engine on hybrid models: a drafted chunk runs as one row of
its last token and its guesses, the DeltaNet layers hand their states after each token and the
row's slot keeps the one after the tokens it kept. Greedy output equals plain decoding, mixed
with plain requests, with rejected guesses, prefix hits and preemption."""

from __future__ import annotations

import pytest
import torch

import qwenkit
from hybrid_tiny import make_hybrid
from qwenkit.engine import Engine, EngineSettings, SamplingParams
from qwenkit.engine.sampling_params import SpeculativeParams
from qwenkit.speculative.proposers import Proposal
from test_engine import random_prompts

VOCAB = 24


class Foresight:
    """Guesses the reference continuation with one wrong guess at a place that moves with the
    position (none at some), so verify calls keep 0..k guesses: each rejection must put the
    row's recurrent state back to the one after the tokens kept."""

    def __init__(self, tokens: list[int]):
        self.tokens = tokens  # prompt + the reference output

    def propose(self, seq, k: int, generator=None) -> Proposal:
        at = len(seq.token_ids)
        guesses = self.tokens[at:at + k]
        wrong = at % (k + 2)
        if wrong < len(guesses):
            guesses[wrong] = (guesses[wrong] + 1) % VOCAB
        return Proposal(guesses)


def run(engine: Engine, requests, refs) -> dict[str, list[int]]:
    """Add every request (the speculative ones guessing through `Foresight`), step until all finish."""
    out = {}
    for i, (prompt, params) in enumerate(requests):
        rid = engine.add_request(prompt, params, request_id=str(i))
        if params.speculative is not None:
            engine.speculation.proposers[engine.requests[rid][0].seq_id] = Foresight(prompt + refs[i])
        out[rid] = []
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id] += o.token_ids
    return out


@pytest.fixture(scope="module", params=["qwen3_next", "qwen3_5_text"])
def model(request, tmp_path_factory):
    # a vocabulary small enough that greedy output repeats itself, so prompt lookup finds guesses
    path = make_hybrid(tmp_path_factory.mktemp(request.param) / "ckpt", request.param, vocab_size=VOCAB)
    m = qwenkit.load_model(path, dtype=torch.float32)
    m.eos_token_ids = []
    return m


def test_mixed_batch_equals_plain_decoding_with_rejections_and_preemption(model):
    prompts = random_prompts(6, 3, 26, VOCAB, seed=3)
    refs = [qwenkit.generate(model, p, 40) for p in prompts]
    spec = SamplingParams(max_tokens=40, temperature=0, speculative=SpeculativeParams(num_speculative_tokens=5))
    plain = SamplingParams(max_tokens=40, temperature=0)
    engine = Engine(model, EngineSettings(block_size=4, num_blocks=40, max_prefill_tokens=16, max_num_seqs=4,
                                          state_snapshot_interval=8))
    out = run(engine, [(p, plain if i % 3 == 0 else spec) for i, p in enumerate(prompts)], refs)
    assert [out[str(i)] for i in range(len(prompts))] == refs
    m = engine.metrics()
    assert m["spec_draft_tokens"] > m["spec_accepted_tokens"] > 40  # guesses kept, and some rejected
    assert m["preemptions"] > 0 and m["kv_blocks_used"] == 0
    assert sorted(engine.blocks.free_slots) == list(range(4))


def test_each_speculative_request_alone_equals_generate(model):
    prompt = random_prompts(1, 12, 13, VOCAB, seed=9)[0]
    ref = qwenkit.generate(model, prompt, 30)
    params = SamplingParams(max_tokens=30, temperature=0, speculative=SpeculativeParams(num_speculative_tokens=3))
    engine = Engine(model, EngineSettings(block_size=4, num_blocks=20))
    assert run(engine, [(prompt, params)], [ref])["0"] == ref
    assert engine.metrics()["spec_accepted_tokens"] > 0
