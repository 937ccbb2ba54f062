"""Speculative decoding: the verify step's rows equal the one-token step bit for bit, the cache
rolls back, greedy output is plain decoding's token for token with every proposer, sampled output
follows the target's distribution (chi-square), and a draft with another tokenizer is refused."""

from __future__ import annotations

import pytest
import torch

import qwenkit
from qwenkit.backends import decode_step, installed, verify_step
from qwenkit.engine.sampler import Sampler
from qwenkit.engine.sampling_params import SamplingParams
from qwenkit.engine.sequence import TokenSequence
from qwenkit.errors import RequestError
from qwenkit.generate import generate, generate_stream
from qwenkit.speculative import NgramProposer, Proposal, SpecStats
from qwenkit.speculative.verify import accept, distribution
from tiny import make_checkpoint

REPEATING = [5, 9, 17, 33, 5, 9, 17, 40, 5, 9, 17, 33, 5, 9, 60, 5, 9, 17]


def write_byte_tokenizer(root, n_bytes: int = 200):
    """A tokenizer of n_bytes single-byte tokens (fewer than any model's rows: padding)."""
    from qwenkit.tokenizer.bpe import build_backend, spell_bytes

    build_backend({spell_bytes(bytes([b])): b for b in range(n_bytes)}, [], []).save(str(root / "tokenizer.json"))
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec")
    target = write_byte_tokenizer(make_checkpoint(root / "target", "qwen2", seed=1))
    draft = write_byte_tokenizer(make_checkpoint(root / "draft", "qwen2", seed=2, vocab_size=240, num_hidden_layers=1))
    other = write_byte_tokenizer(make_checkpoint(root / "other", "qwen2", seed=3), n_bytes=190)
    return {"target": target, "draft": draft, "other": other}


@pytest.mark.parametrize("arch,quantize", [("qwen2", None), ("qwen3", None), ("qwen2", "int8"), ("qwen3-bias", "int4")])
def test_verify_rows_equal_one_token_steps(tmp_path, arch, quantize):
    model = qwenkit.load_model(make_checkpoint(tmp_path, arch, seed=4), dtype=torch.float32, quantize=quantize)
    assert installed(model) == "cpu-kernels"
    prompt, tokens = torch.tensor([REPEATING]), torch.tensor([[7, 11, 13, 200, 3, 99, 42, 8, 1]])
    with torch.inference_mode():
        one, many = model.new_cache(1, 64), model.new_cache(1, 64)
        model(prompt, cache=one), model(prompt, cache=many)
        step = decode_step(model)
        singles = torch.cat([step(tokens[:, i:i + 1], cache=one, logits_to_keep=1) for i in range(9)], 1)
        rows = verify_step(model)(tokens, cache=many)
    assert torch.equal(rows, singles)  # bit for bit: greedy speculation is plain decoding
    assert torch.equal(one.k[:, :, :, :one.length], many.k[:, :, :, :many.length])


def test_trim_rolls_back_rejected_tokens(tiny):
    model = qwenkit.load_model(tiny["target"], dtype=torch.float32)
    with torch.inference_mode():
        cache = model.new_cache(1, 64)
        model(torch.tensor([REPEATING]), cache=cache)
        verify_step(model)(torch.tensor([[1, 2, 3, 4]]), cache=cache)  # last token + 3 proposals
        cache.trim(2)  # two rejected: the cache holds the prompt, 1 and 2
        assert cache.length == len(REPEATING) + 2
        after = decode_step(model)(torch.tensor([[77]]), cache=cache, logits_to_keep=1)
        fresh = model.new_cache(1, 64)
        model(torch.tensor([REPEATING + [1, 2]]), cache=fresh)
        plain = decode_step(model)(torch.tensor([[77]]), cache=fresh, logits_to_keep=1)
    torch.testing.assert_close(after, plain, rtol=0, atol=1e-5)  # prefill vs verify numerics: close, not equal
    with pytest.raises(ValueError, match="cannot forget"):
        cache.trim(cache.length + 1)


class Corrupting:
    """Proposes the plain decode's own continuation with every third token wrong: both kept and
    replaced proposals happen, at known places."""

    needs_hidden = False

    def __init__(self, truth: list[int], prompt_len: int):
        self.truth, self.prompt_len = truth, prompt_len

    def propose(self, seq, k, generator=None, hidden=None):
        done = seq.num_output_tokens
        guess = self.truth[done:done + k]
        return Proposal([t if (done + i) % 3 else (t + 1) % 200 for i, t in enumerate(guess)])


def test_greedy_is_plain_decoding_for_every_proposer(tiny):
    model = qwenkit.load_model(tiny["target"], dtype=torch.float32)
    prompt = REPEATING * 3
    plain = generate(model, prompt, 40, stop_token_ids=[])
    stop = plain[12]  # a stop token inside an accepted run ends the output there, as in plain decoding
    plain_stopped = generate(model, prompt, 40, stop_token_ids=[stop])
    assert len(plain_stopped) < 40
    proposers = ["ngram", f"draft:{tiny['draft']}", NgramProposer(max_n=2, min_n=1), Corrupting(plain, len(prompt))]
    for spec in proposers:
        stats = SpecStats()
        out = list(generate_stream(model, prompt, 40, stop_token_ids=[], speculative=spec, spec_stats=stats))
        assert out == plain, spec
        assert stats.proposed > 0, spec  # the speculative path ran
        assert generate(model, prompt, 40, stop_token_ids=[stop], speculative=spec) == plain_stopped, spec


def test_sampled_generation_with_a_draft_stops_and_stays_in_vocab(tiny):
    model = qwenkit.load_model(tiny["target"], dtype=torch.float32)
    out = generate(model, REPEATING, 30, temperature=0.8, top_k=20, seed=3, stop_token_ids=[],
                   speculative=f"draft:{tiny['draft']}")
    assert len(out) == 30 and all(0 <= t < model.config.vocab_size for t in out)
    again = generate(model, REPEATING, 30, temperature=0.8, top_k=20, seed=3, stop_token_ids=[],
                     speculative=f"draft:{tiny['draft']}")
    assert again == out  # a seed fixes speculative sampling too


def test_sampled_tokens_follow_the_target_distribution(tiny):
    """20,000 verify outcomes from real logits: the first token follows p0, and after a kept first
    proposal the second follows p1 (chi-square, fixed seeds)."""
    model = qwenkit.load_model(tiny["target"], dtype=torch.float32)
    params = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.2, seed=0)
    seq0 = TokenSequence(REPEATING, params)
    with torch.inference_mode():
        cache = model.new_cache(1, 64)
        model(torch.tensor([REPEATING[:-1]]), cache=cache)
        p0 = distribution(decode_step(model)(torch.tensor([REPEATING[-1:]]), cache=cache)[0, -1], seq0)
        best = int(p0.argmax())  # the proposal row 1 is computed after
        cache.trim(1)
        logits = verify_step(model)(torch.tensor([[REPEATING[-1], best, 5]]), cache=cache)[0]  # (3, V)
    q = torch.softmax(torch.randn(2, logits.shape[1], generator=torch.Generator().manual_seed(1)), -1)
    q[0] = 0.5 * torch.nn.functional.one_hot(torch.tensor(best), q.shape[1]) + 0.5 * p0  # partly right
    sampler, gen = Sampler(seed=0), torch.Generator().manual_seed(2)
    first, second = [], []
    for _ in range(20_000):
        d = [int(torch.multinomial(q[0], 1, generator=gen)), int(torch.multinomial(q[1], 1, generator=gen))]
        seq = TokenSequence(REPEATING, params)
        seq.seq_id = seq0.seq_id  # one generator (the request's seed) across the draws
        new = accept(logits, Proposal(d, q), seq, sampler, set(), 10)
        first.append(new[0])
        if new[0] == d[0] == best:
            second.append(new[1])
    assert _chi_square_p(first, p0) > 1e-3
    p1 = distribution(logits[1], TokenSequence(REPEATING + [best], params))
    assert len(second) > 500 and _chi_square_p(second, p1) > 1e-3


def _chi_square_p(samples: list[int], p: torch.Tensor) -> float:
    """The p-value of the samples under p, cells with expected counts under 5 pooled."""
    counts = torch.bincount(torch.tensor(samples), minlength=p.shape[0]).double()
    expected = p.double() * len(samples)
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0), torch.tensor(stat / 2.0)))


def test_a_draft_with_another_tokenizer_is_refused(tiny):
    model = qwenkit.load_model(tiny["target"], dtype=torch.float32)
    with pytest.raises(RequestError, match="tokenizer differs"):
        generate(model, [1, 2, 3], 4, speculative=f"draft:{tiny['other']}")
    with pytest.raises(RequestError, match="expected 'ngram', 'draft:PATH' or 'mtp'"):
        generate(model, [1, 2, 3], 4, speculative="eagle")


def _cli(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "qwenkit.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_speculative_output_equals_plain_and_a_bad_draft_is_one_line(tiny):
    common = ["generate", "--model", str(tiny["target"]), "--dtype", "float32", "-p", "abcabcabcab",
              "--max-new-tokens", "24"]
    plain, spec = _cli(*common), _cli(*common, "--speculative", "ngram")
    assert plain.returncode == spec.returncode == 0 and spec.stdout == plain.stdout
    bad = _cli(*common, "--speculative", f"draft:{tiny['other']}")
    assert bad.returncode != 0 and "tokenizer differs" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_default_model_greedy_is_plain_decoding_on_40_prompts(default_model_path):
    """The default model's int8 fused step: prompt lookup on 40 prompts that invite copying."""
    model = qwenkit.load_model(default_model_path)
    tok = qwenkit.load_tokenizer(default_model_path)
    names = ["alpha", "beta", "gamma", "delta", "omega"]
    prompts = [f"Repeat this line exactly, then explain it in one sentence:\nresult_{i} = {names[i % 5]}"
               f"({i}, {i * 7}) + helper_{i % 3}(values[{i}:{i + 4}])" for i in range(32)]
    prompts += [f"Fix the typo and output the code:\ndef f{i}(x):\n    retrun x * {i}\n" for i in range(8)]
    proposed = 0
    for text in prompts:
        ids = tok.encode_chat([{"role": "user", "content": text}])
        stats = SpecStats()
        spec = list(generate_stream(model, ids, 24, speculative="ngram", spec_stats=stats))
        assert spec == generate(model, ids, 24), text
        proposed += stats.proposed
    assert proposed > 0  # the speculative path ran
