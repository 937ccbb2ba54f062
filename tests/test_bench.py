"""Benchmark plumbing that can be checked without timing anything."""

from __future__ import annotations

import torch

import qwenkit
from qwenkit.bench.bounds import weight_bytes_per_token
from qwenkit.bench.scaling import as_mha, decode_rate, kv_bytes
from qwenkit.config import QwenConfig


def _tiny(**kw):
    cfg = QwenConfig(model_type="qwen2", vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096, **kw)
    return qwenkit.build_model(cfg).init_weights(std=0.1, seed=0).eval()


def test_mha_twin_computes_the_same_function_with_a_bigger_cache():
    gqa = _tiny()
    mha = as_mha(gqa)
    ids = torch.randint(0, 2048, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(gqa(ids), mha(ids), atol=1e-5, rtol=1e-5)
    assert qwenkit.generate(gqa, ids[0].tolist(), 8) == qwenkit.generate(mha, ids[0].tolist(), 8)
    assert kv_bytes(mha, 100, 2) == 4 * kv_bytes(gqa, 100, 2)
    assert decode_rate(gqa, context=64, batch=2, steps=2) > 0


def test_weight_bytes_count_the_tied_head_once_as_a_matrix_read():
    tied, untied = _tiny(tie_word_embeddings=True), _tiny()
    matrices = sum(p.numel() * 4 for n, p in untied.named_parameters() if "embed_tokens" not in n)
    assert weight_bytes_per_token(untied) == matrices
    assert weight_bytes_per_token(tied) == matrices  # the tied head reads the embedding table
