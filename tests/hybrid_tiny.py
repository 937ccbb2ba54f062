"""Tiny random-weight hybrid checkpoints (Qwen3-Next, Qwen3.5 dense and MoE) saved by transformers.

Each has both layer kinds (Gated DeltaNet and gated full attention), GQA, several value heads per
key head in the DeltaNet, and partial rotary; the MoE ones have a shared expert. Weights are drawn
by `tiny.randomize` (norms and biases too, so a dropped one shows), then the decay parameters as
the reference initialises them (A in [1, 16], dt_bias around 1): with the near-zero decays of a
plain normal draw, the tiny model amplifies float32 rounding (1e-6 in, 1e-4 out) past any tolerance.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tiny import randomize

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
            rms_norm_eps=1e-6, tie_word_embeddings=False, linear_conv_kernel_dim=4,
            linear_key_head_dim=8, linear_value_head_dim=12, linear_num_key_heads=2,
            linear_num_value_heads=4, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                       "partial_rotary_factor": 0.5})
MOE = dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=40)

HYBRIDS = {
    "qwen3_5_text": dict(model_type="qwen3_5_text"),  # default interval: layers 0-2 linear, 3 full
    "qwen3_next": dict(model_type="qwen3_next", **MOE, norm_topk_prob=True, mlp_only_layers=[1],
                       layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"]),
    "qwen3_5_moe_text": dict(model_type="qwen3_5_moe_text", **MOE, tie_word_embeddings=True,
                             layer_types=["full_attention", "linear_attention", "linear_attention", "full_attention"]),
}


def hf_classes(model_type: str):
    import transformers

    names = {"qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM"),
             "qwen3_5_text": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM"),
             "qwen3_5_moe_text": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM")}[model_type]
    return getattr(transformers, names[0]), getattr(transformers, names[1])


def make_hybrid(path: Path, arch: str, seed: int = 0, dtype=torch.float32, **overrides) -> Path:
    """Save a random transformers model of `arch` (a HYBRIDS key) to `path`."""
    spec = {**BASE, **HYBRIDS[arch], **overrides}
    model_type = spec.pop("model_type")
    if model_type == "qwen3_5_moe_text":
        spec.pop("intermediate_size")
    config_cls, model_cls = hf_classes(model_type)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**spec)).float()
    randomize(model, seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.empty(p.shape).uniform_(1.0, 16.0, generator=gen).log())
            elif name.endswith("dt_bias"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
    model.to(dtype).save_pretrained(path)
    return path
