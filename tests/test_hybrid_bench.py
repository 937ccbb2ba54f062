"""`qwenkit bench scaling --hybrid`: the random hybrid and its full-attention twin decode, and the
cache a step reads grows with context only through the attention layers."""

from __future__ import annotations

import torch

from qwenkit.backends import installed
from qwenkit.bench.scaling import decode_rate, hybrid_pair, hybrid_shape, kv_bytes
from qwenkit.config import QwenConfig

TINY = {"model_type": "qwen3_5_text", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 8, "linear_value_head_dim": 8}


def test_hybrid_pair_decodes_and_reads_a_quarter_of_the_kv():
    models = hybrid_pair(QwenConfig.from_dict(TINY), torch.float32, "cpu")
    hybrid, full = models["hybrid"], models["full-attn"]
    assert hybrid.config.is_hybrid and not full.config.is_hybrid
    assert installed(hybrid) == installed(full) == "torch"  # the gated attention has no C form
    for model in models.values():
        assert decode_rate(model, context=64, batch=2, steps=2) > 0
    grow = lambda m: kv_bytes(m, 1024, 1) - kv_bytes(m, 512, 1)  # noqa: E731
    assert grow(full) == 4 * grow(hybrid)


def test_hybrid_shape_keeps_the_preset_width_and_layer_pattern():
    cfg = hybrid_shape("qwen3.5-9b", layers=8, vocab=4096)
    assert cfg.hidden_size == 4096 and cfg.linear_num_value_heads == 32 and cfg.vocab_size == 4096
    assert cfg.attention_layers == (3, 7)


def test_bench_prefix_hits_the_shared_prefix_with_identical_tokens():
    """`qwenkit bench prefix` on a tiny hybrid: the second request of each repeat starts from the
    snapshot at the end of the shared prefix, and its tokens equal the uncached engine's."""
    from qwenkit.bench.prefix import run
    from qwenkit.loader import build_model

    model = build_model(QwenConfig.from_dict(TINY), torch.float32, "cpu").init_weights(seed=0).eval()
    model.eos_token_ids = []
    result = run(model, prefix_len=40, suffix_len=5, repeats=2, max_tokens=4, interval=16)
    assert result["tokens_identical"]
    # per repeat: a 45-token first request (no hit) and a second one hitting 32 tokens (the snapshot at 32)
    assert result["hit_tokens"] == 2 * 32
    assert result["queried_tokens"] == 6 + 2 * 2 * 45  # the warm-up request's 6 tokens first
    assert set(result["ttft_s"]) == {"first (no hit)", "hit", "no cache"}
