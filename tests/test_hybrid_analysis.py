"""Costs of hybrid models from their config: parameters as the model holds them, KV bytes of the
attention layers only, a fixed recurrent state per sequence, and FLOPs that grow only with them."""

from __future__ import annotations

import torch

from qwenkit.analysis import (flops_per_token, kv_cache_bytes_per_token, memory_plan, parameter_counts,
                              state_bytes_per_sequence)
from qwenkit.config import QwenConfig
from qwenkit.loader import build_model
from qwenkit.presets import get_preset

TINY = {"model_type": "qwen3_next", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 8,
        "linear_value_head_dim": 12, "num_experts": 6, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 40, "mlp_only_layers": [1]}


def test_parameter_count_is_what_the_model_holds():
    for fields in (TINY, {**TINY, "model_type": "qwen3_5_text"}, {**TINY, "model_type": "qwen3_5_moe_text"}):
        cfg = QwenConfig.from_dict(fields)
        with torch.device("meta"):
            model = build_model(cfg, device="meta")
        assert parameter_counts(cfg)["total"] == sum(p.numel() for p in model.parameters())


def test_kv_bytes_count_attention_layers_and_state_is_fixed_per_sequence():
    cfg = get_preset("qwen3-next-80b-a3b")
    assert len(cfg.attention_layers) == 12 and cfg.attention_layers[:2] == (3, 7)
    assert kv_cache_bytes_per_token(cfg, 2) == 2 * 12 * 2 * 256 * 2  # 24,576 bytes
    # 36 DeltaNet layers: conv inputs (2*16*128 + 32*128) x 3 in bf16, state 32 x 128 x 128 in fp32
    assert state_bytes_per_sequence(cfg, 2) == 36 * (8192 * 3 * 2 + 32 * 128 * 128 * 4)
    plan = memory_plan(cfg, "bf16", context=4096, batch=8)
    assert plan["per_device"]["recurrent_state"] == 8 * state_bytes_per_sequence(cfg, 2)
    full = cfg.replace(layer_types=("full_attention",) * 48)
    assert kv_cache_bytes_per_token(full, 2) == 4 * kv_cache_bytes_per_token(cfg, 2)


def test_flops_grow_with_context_only_through_attention_layers():
    cfg = get_preset("qwen3.5-9b")
    growth = flops_per_token(cfg, 32768) - flops_per_token(cfg, 512)
    assert growth == 4 * 8 * 16 * 256 * (32768 - 512)  # 8 attention layers of 32
