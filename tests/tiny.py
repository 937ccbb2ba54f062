"""Tiny random-weight checkpoints made with transformers (the reference), for parity tests.

Every parameter is drawn at random (biases and norm weights too, so a dropped one shows),
with a scale that keeps logits well separated so greedy continuations are stable.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
            rms_norm_eps=1e-6, tie_word_embeddings=False)

MOE = dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32)

ARCHS = {
    "qwen2": dict(model_type="qwen2", rope_theta=1e6),
    "qwen2-tied": dict(model_type="qwen2", tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", head_dim=24, tie_word_embeddings=True),
    "qwen3-bias": dict(model_type="qwen3", head_dim=16, attention_bias=True),
    "qwen2_moe": dict(model_type="qwen2_moe", **MOE, shared_expert_intermediate_size=48,
                      decoder_sparse_step=1, mlp_only_layers=[1]),
    "qwen2_moe-step2": dict(model_type="qwen2_moe", **MOE, shared_expert_intermediate_size=40,
                            decoder_sparse_step=2, norm_topk_prob=True),
    "qwen3_moe": dict(model_type="qwen3_moe", head_dim=16, **MOE, norm_topk_prob=True),
    "qwen2-sliding": dict(model_type="qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1),
}

ROPES = {
    "linear-rope_scaling-type": {"rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 10000.0},
    "dynamic-rope_scaling-rope_type": {"rope_scaling": {"rope_type": "dynamic", "factor": 3.0},
                                       "rope_theta": 10000.0, "max_position_embeddings": 24},
    "yarn-rope_parameters": {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
                                                 "original_max_position_embeddings": 16}},
    "yarn-rope_scaling-mscale": {"rope_scaling": {"type": "yarn", "factor": 2.0, "beta_fast": 16,
                                                  "original_max_position_embeddings": 32}, "rope_theta": 5e5},
}


def hf_classes(model_type: str):
    import transformers

    names = {"qwen2": "Qwen2", "qwen2_moe": "Qwen2Moe", "qwen3": "Qwen3", "qwen3_moe": "Qwen3Moe"}[model_type]
    return getattr(transformers, f"{names}Config"), getattr(transformers, f"{names}ForCausalLM")


@torch.no_grad()
def randomize(model, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.2 * noise)
        elif name.endswith("bias"):
            p.copy_(0.3 * noise)
        elif "embed_tokens" in name:
            p.copy_(noise)
        else:
            fan_in = p.shape[-1]
            p.copy_(noise * (1.5 / fan_in**0.5))


def make_checkpoint(path: Path, arch: str = "qwen2", config_json: dict | None = None, seed: int = 0,
                    max_shard_size=None, **overrides) -> Path:
    """Save a random transformers model of `arch` to `path`; `config_json` entries are written
    verbatim into config.json afterwards (to test historical spellings)."""
    spec = {**BASE, **ARCHS[arch], **overrides}
    model_type = spec.pop("model_type")
    config_cls, model_cls = hf_classes(model_type)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**spec)).float()
    randomize(model, seed)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kw)
    if config_json:
        cfg_path = path / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("rope_parameters", None)
        cfg.update(config_json)
        cfg_path.write_text(json.dumps(cfg, indent=2))
    return path


def load_reference(path: Path):
    """transformers' model for a checkpoint directory, fp32, eager-free (sdpa) as shipped."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference relative to max(1, max |logit|)."""
    return float((a - b).abs().max() / max(1.0, float(b.abs().max())))


def left_padded(seqs: list[torch.Tensor], T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask), each (len(seqs), T): every sequence right-aligned, zeros before it."""
    batch = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        batch[i, T - len(s):], mask[i, T - len(s):] = s, 1
    return batch, mask
