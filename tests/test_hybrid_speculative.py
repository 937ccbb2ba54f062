"""Speculative decoding on hybrid models: the cache takes the recurrent state back (conv and
delta-rule states and K/V after `trim` equal those of feeding fewer tokens), greedy output is plain
decoding's with every proposer (prompt lookup, a hybrid draft, the MTP head) on Qwen3-Next and
Qwen3.5 dense and MoE, the MTP head computes the published formula on transformers' own modules,
and what cannot speculate says so in one line (the engine: tests/test_hybrid_spec_engine.py)."""

from __future__ import annotations

import pytest
import torch

import qwenkit
from hybrid_tiny import HYBRIDS, add_mtp, make_hybrid
from qwenkit.engine.sampling_params import SamplingParams
from qwenkit.engine.sequence import TokenSequence
from qwenkit.errors import RequestError
from qwenkit.generate import generate, generate_stream
from qwenkit.model.cache import StateRollbackError
from qwenkit.speculative import SpecStats
from qwenkit.speculative.mtp import MTPProposer
from test_speculative import REPEATING, Corrupting, _cli, write_byte_tokenizer
from tiny import rel_diff


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Each hybrid with a random MTP head (stacked experts for Qwen3.5 MoE), and one without."""
    root = tmp_path_factory.mktemp("hspec")
    out = {arch: write_byte_tokenizer(add_mtp(make_hybrid(root / arch, arch, seed=i), seed=i + 10,
                                              fused_experts=arch == "qwen3_5_moe_text"))
           for i, arch in enumerate(HYBRIDS)}
    out["plain"] = write_byte_tokenizer(make_hybrid(root / "plain", "qwen3_5_text", seed=7))
    return out


def _states(cache):
    return [*cache.conv, *cache.state]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-11), (torch.float32, 1e-5)])
def test_trim_restores_the_state_after_the_calls_first_tokens(ckpts, dtype, tol):
    model = qwenkit.load_model(ckpts["qwen3_next"], dtype=dtype)
    prompt, call = torch.tensor([REPEATING]), torch.tensor([[7, 11, 13, 200, 3, 99]])  # T = 6
    with torch.inference_mode():
        for n in range(1, 6):
            a, b = model.new_cache(1, 64), model.new_cache(1, 64)
            model(prompt, cache=a), model(prompt, cache=b)
            a.expect_trim(5)
            model(call, cache=a)
            a.trim(n)
            model(call[:, :6 - n], cache=b)  # the first T - n tokens alone
            assert a.length == b.length == len(REPEATING) + 6 - n
            for x, y in zip(_states(a), _states(b)):
                assert (x - y).abs().max() <= tol * max(1.0, y.abs().max())
            torch.testing.assert_close(a.kv.k[:, :, :, :a.length], b.kv.k[:, :, :, :b.length], rtol=0, atol=tol)
            torch.testing.assert_close(a.kv.v[:, :, :, :a.length], b.kv.v[:, :, :, :b.length], rtol=0, atol=tol)
            after = [model(torch.tensor([[77]]), cache=c)[0, -1] for c in (a, b)]
            torch.testing.assert_close(after[0], after[1], rtol=0, atol=100 * tol)


def test_trim_reaches_back_over_one_token_calls_as_far_as_expected(ckpts):
    """A draft model feeds its guesses one call each: expect_trim holds over the calls."""
    model = qwenkit.load_model(ckpts["qwen3_5_text"], dtype=torch.float64)
    with torch.inference_mode():
        a, b = model.new_cache(1, 64), model.new_cache(1, 64)
        model(torch.tensor([REPEATING]), cache=a), model(torch.tensor([REPEATING + [7]]), cache=b)
        a.expect_trim(3)
        for t in (7, 11, 13):
            model(torch.tensor([[t]]), cache=a)
        a.trim(2)
        for x, y in zip(_states(a), _states(b)):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-11)
        with pytest.raises(StateRollbackError, match="cannot forget 2 tokens: states are kept for the last 1"):
            a.trim(2)
        a.expect_trim(0)
        model(torch.tensor([[5, 6]]), cache=a)
        with pytest.raises(StateRollbackError, match="recurrent state"):
            a.trim(1)


def test_verify_rows_are_one_token_steps_up_to_rounding(ckpts):
    model = qwenkit.load_model(ckpts["qwen3_5_moe_text"], dtype=torch.float32)
    tokens = torch.tensor([[7, 11, 13, 200, 3, 99, 42]])
    with torch.inference_mode():
        one, many = model.new_cache(1, 64), model.new_cache(1, 64)
        model(torch.tensor([REPEATING]), cache=one), model(torch.tensor([REPEATING]), cache=many)
        singles = torch.cat([model(tokens[:, i:i + 1], cache=one) for i in range(7)], 1)
        many.expect_trim(6)
        rows = model(tokens, cache=many)
    assert rel_diff(rows, singles) < 1e-5  # float32 sums in another order, as a prefill's rows


@pytest.mark.parametrize("arch", list(HYBRIDS))
def test_greedy_is_plain_decoding_with_every_proposer_on_hybrids(ckpts, arch):
    model = qwenkit.load_model(ckpts[arch], dtype=torch.float32)
    prompt = REPEATING * 2
    plain = generate(model, prompt, 32, stop_token_ids=[])
    stop = plain[10]
    plain_stopped = generate(model, prompt, 32, stop_token_ids=[stop])
    draft = ckpts["qwen3_next" if arch == "qwen3_5_text" else "qwen3_5_text"]  # a hybrid draft
    for spec in ["ngram", "mtp", f"draft:{draft}", Corrupting(plain, len(prompt))]:
        stats = SpecStats()
        out = list(generate_stream(model, prompt, 32, stop_token_ids=[], speculative=spec, spec_stats=stats))
        assert out == plain, spec
        assert spec == "ngram" or stats.proposed > 0, spec  # the speculative path ran (lookup may find nothing)
        assert generate(model, prompt, 32, stop_token_ids=[stop], speculative=spec) == plain_stopped, spec


def test_sampled_mtp_generation_is_seeded_and_in_vocab(ckpts):
    model = qwenkit.load_model(ckpts["qwen3_next"], dtype=torch.float32)
    runs = [generate(model, REPEATING, 24, temperature=0.9, top_k=30, seed=5, stop_token_ids=[], speculative="mtp")
            for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) == 24 and all(0 <= t < 256 for t in runs[0])


def _reference_head(hf, mtp: dict, ids: torch.Tensor, hidden: torch.Tensor):
    """The published MTP formula on transformers' Qwen3.5 modules (embeddings first, both normed,
    fc, one full-attention decoder layer at positions 0.., mtp.norm, the model's lm_head) over
    rows (ids (1, T), hidden (1, T, H)) -> (outputs y (1, T, H), logits (1, T, V))."""
    import copy

    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5DecoderLayer, Qwen3_5RMSNorm

    cfg = copy.deepcopy(hf.config)
    cfg.layer_types, cfg.num_hidden_layers, cfg._attn_implementation = ["full_attention"], 1, "sdpa"
    layer = Qwen3_5DecoderLayer(cfg, 0)
    layer.load_state_dict({k.removeprefix("mtp.layers.0."): v for k, v in mtp.items() if k.startswith("mtp.layers.0.")})

    def norm(name, x):
        n = Qwen3_5RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        n.weight.data.copy_(mtp[f"mtp.{name}.weight"])
        return n(x)

    T = ids.shape[1]
    x = torch.cat([norm("pre_fc_norm_embedding", hf.model.embed_tokens(ids)), norm("pre_fc_norm_hidden", hidden)], -1)
    x = torch.nn.functional.linear(x, mtp["mtp.fc.weight"])
    rope = hf.model.rotary_emb(x, torch.arange(T)[None, None].expand(3, 1, T))
    causal = torch.full((T, T), float("-inf")).triu(1)[None, None]
    y = norm("norm", layer(x, position_embeddings=rope, attention_mask=causal))
    return y, hf.lm_head(y)


def test_mtp_head_is_the_published_formula_on_transformers_modules(ckpts):
    """A proposal's draw distribution at the first guess and at a chained one (temperature 1: the
    softmax of the head's logits) against the formula computed on the reference's modules."""
    from hybrid_tiny import hf_classes

    path = ckpts["qwen3_5_text"]
    model = qwenkit.load_model(path, dtype=torch.float32)
    hf = hf_classes("qwen3_5_text")[1].from_pretrained(path, dtype=torch.float32).eval()
    prompt = torch.tensor([REPEATING])  # (1, P)
    with torch.inference_mode():
        _, hidden = model(prompt, return_hidden=True)  # (1, P, H)
        ref_hidden = hf.model(prompt).last_hidden_state  # after the final norm
        torch.testing.assert_close(hidden, ref_hidden, rtol=0, atol=1e-4)
        seq = TokenSequence(REPEATING, SamplingParams(temperature=1.0, seed=0))
        proposal = MTPProposer(model).propose(seq, 2, torch.Generator().manual_seed(0), hidden[0, :-1])
        y, logits = _reference_head(hf, model.mtp_weights, prompt[:, 1:], ref_hidden[:, :-1])
        torch.testing.assert_close(proposal.probs[0], logits[0, -1].softmax(-1), rtol=0, atol=1e-5)
        ids = torch.cat([prompt[:, 1:], torch.tensor([[proposal.tokens[0]]])], 1)
        _, chained = _reference_head(hf, model.mtp_weights, ids, torch.cat([ref_hidden[:, :-1], y[:, -1:]], 1))
        torch.testing.assert_close(proposal.probs[1], chained[0, -1].softmax(-1), rtol=0, atol=1e-5)


def test_mtp_without_weights_is_refused_naming_the_checkpoint(ckpts):
    model = qwenkit.load_model(ckpts["plain"], dtype=torch.float32)
    with pytest.raises(RequestError, match=f"speculative mtp: {ckpts['plain']} has no multi-token-prediction"):
        generate(model, [1, 2, 3], 4, speculative="mtp")


def test_cli_mtp_output_equals_plain_and_no_head_is_one_line(ckpts):
    common = ["generate", "--model", str(ckpts["qwen3_next"]), "--dtype", "float32", "-p", "abcabcabcab",
              "--max-new-tokens", "16"]
    plain, spec = _cli(*common), _cli(*common, "--speculative", "mtp")
    assert plain.returncode == spec.returncode == 0 and spec.stdout == plain.stdout
    bad = _cli("chat", "--model", str(ckpts["plain"]), "--message", "hi", "--speculative", "mtp")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert str(ckpts["plain"]) in bad.stderr and "multi-token-prediction" in bad.stderr
