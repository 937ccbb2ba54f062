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
from qwenkit.errors import RequestError
from qwenkit.speculative.proposers import Proposal
from test_engine import random_prompts

VOCAB = 24


class Foresight:
    """Guesses the reference continuation with one wrong guess at a place that moves with the
    position (none at some), so verify calls keep 0..k guesses: each rejection must put the
    row's recurrent state back to the one after the tokens kept."""

    needs_hidden = False

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


@pytest.fixture(scope="module")
def mtp_model(tmp_path_factory):
    from hybrid_tiny import add_mtp

    path = add_mtp(make_hybrid(tmp_path_factory.mktemp("mtp") / "ckpt", "qwen3_5_text", vocab_size=VOCAB), seed=3)
    m = qwenkit.load_model(path, dtype=torch.float32)
    m.eos_token_ids = []
    return m


def test_mtp_requests_with_prefix_hits_and_preemption_equal_plain_decoding(mtp_model):
    """The MTP head guesses from the hidden states the runner keeps; requests that start from a
    prefix hit show the head only the positions they computed (the rest masked)."""
    system = random_prompts(1, 17, 18, VOCAB, seed=5)[0]
    prompts = random_prompts(5, 2, 12, VOCAB, seed=6, prefix=system)
    refs = [qwenkit.generate(mtp_model, p, 24) for p in prompts]
    mtp = SamplingParams(max_tokens=24, temperature=0, speculative=SpeculativeParams("mtp", 3))
    plain = SamplingParams(max_tokens=24, temperature=0)
    engine = Engine(mtp_model, EngineSettings(block_size=4, num_blocks=22, max_prefill_tokens=16, max_num_seqs=3,
                                              state_snapshot_interval=8))
    out = {}
    for i, p in enumerate(prompts):
        out[engine.add_request(p, plain if i == 2 else mtp, request_id=str(i))] = []
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id] += o.token_ids
    assert [out[str(i)] for i in range(len(prompts))] == refs
    m = engine.metrics()
    assert m["spec_draft_tokens"] > 20 and m["prefix_cache_hit_tokens"] >= 16 and m["preemptions"] > 0


def test_mtp_is_refused_by_name_for_a_checkpoint_without_a_head(model):
    engine = Engine(model, EngineSettings(block_size=4, num_blocks=20))
    with pytest.raises(RequestError, match="speculative mtp: .* has no multi-token-prediction"):
        engine.add_request([1, 2, 3], SamplingParams(max_tokens=4, speculative=SpeculativeParams("mtp")))


def test_engine_mtp_guesses_equal_the_head_run_over_the_whole_text(mtp_model):
    """Each guess the engine's MTP proposer made (from the hidden states its runner kept, across
    prefill chunks, decode steps and verify rows) is what a fresh head makes from one forward over
    the whole text so far."""
    from qwenkit.engine.sequence import TokenSequence
    from qwenkit.speculative.mtp import MTPProposer

    prompt = random_prompts(1, 21, 22, VOCAB, seed=8)[0]
    params = SamplingParams(max_tokens=40, temperature=0, speculative=SpeculativeParams("mtp", 3))
    engine = Engine(mtp_model, EngineSettings(block_size=4, num_blocks=20, max_prefill_tokens=8))
    made, propose = [], engine.speculation.propose

    def spy(seq, *args):
        guesses = propose(seq, *args)
        made.append((list(seq.token_ids), guesses))
        return guesses
    engine.scheduler.propose = spy
    engine.add_request(prompt, params)
    while engine.has_unfinished():
        engine.step()
    made = [(tokens, guesses) for tokens, guesses in made if guesses]  # none when backed off or at the end
    assert len(made) >= 4
    for tokens, guesses in made:
        with torch.inference_mode():
            _, hidden = mtp_model(torch.tensor([tokens[:-1]]), return_hidden=True)
        view = TokenSequence(tokens, params)
        assert MTPProposer(mtp_model).propose(view, len(guesses), None, hidden[0]).tokens == guesses


def test_serve_speculates_with_the_mtp_head_by_default(tmp_path):
    """`qwenkit serve --speculative mtp` on a hybrid checkpoint with an MTP head answers as plain
    decoding does and counts its drafts; without a head it refuses to start, in one line."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    import subprocess
    import sys

    import httpx
    from hybrid_tiny import add_mtp
    from test_server import VOCAB as SERVER_VOCAB, write_tokenizer
    from test_server_cli import free_port, served_process

    ckpt = make_hybrid(tmp_path / "tiny-mtp", "qwen3_5_text", vocab_size=SERVER_VOCAB)
    write_tokenizer(ckpt)
    reference, tokenizer = qwenkit.load_model(ckpt, dtype=torch.float32), qwenkit.load_tokenizer(ckpt)
    prompt = "def add(a, b): return a + b  # and def sub(a, b):"
    expected = tokenizer.decode(qwenkit.generate(reference, tokenizer.encode(prompt), 12), skip_special_tokens=True)
    add_mtp(ckpt, seed=1)
    port = free_port()
    with served_process(ckpt, port, "--kv-cache-memory", "1MiB", "--speculative", "mtp"):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        r = client.completions.create(model="tiny-mtp", prompt=prompt, max_tokens=12, temperature=0)
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert r.choices[0].text == expected
    drafts = [line for line in metrics.splitlines() if line.startswith("vllm:spec_decode_num_draft_tokens_total")]
    assert drafts and float(drafts[0].split()[-1]) > 0
    plain = make_hybrid(tmp_path / "no-head", "qwen3_5_text", vocab_size=SERVER_VOCAB)
    write_tokenizer(plain)
    cli = "import sys; from qwenkit.cli import main; sys.exit(main())"
    bad = subprocess.run([sys.executable, "-c", cli, "serve", "--model", str(plain), "--port", str(free_port()),
                          "--speculative", "mtp"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "multi-token-prediction" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
