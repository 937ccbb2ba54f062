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


def add_mtp(path: Path, seed: int = 0, fused_experts: bool = False, scale: float = 1.0) -> Path:
    """Give the checkpoint at `path` a random MTP head under the published names, in its own
    safetensors file as the releases shard it: mtp.fc, the three norms, and `mtp.layers.0.*`, a
    full-attention layer (attention and its norms shaped as a full-attention layer's, the MLP as
    layer 0's; experts one by one as Qwen3-Next stores them, or stacked as `experts.gate_up_proj`
    / `experts.down_proj` as Qwen3.5 MoE does). `scale` multiplies every drawn matrix."""
    import json

    from safetensors.torch import load_file, save_file

    config = json.loads((path / "config.json").read_text())
    types = config.get("layer_types") or [("full_attention" if (i + 1) % 4 == 0 else "linear_attention")
                                          for i in range(config["num_hidden_layers"])]
    full = types.index("full_attention")
    model = load_file(path / "model.safetensors")
    shapes = {f"layers.0.{k.split('.', 3)[3]}": v.shape for k, v in model.items()
              if k.startswith(f"model.layers.{full}.") and ".mlp." not in k}
    shapes |= {f"layers.0.{k.split('.', 3)[3]}": v.shape for k, v in model.items() if k.startswith("model.layers.0.mlp.")}
    if fused_experts:
        shapes = _stack_experts(shapes)
    H = config["hidden_size"]
    shapes |= {"fc.weight": (H, 2 * H), "pre_fc_norm_embedding.weight": (H,), "pre_fc_norm_hidden.weight": (H,),
               "norm.weight": (H,)}
    gen = torch.Generator().manual_seed(seed)
    mtp = {}
    for name, shape in sorted(shapes.items()):
        noise = torch.randn(shape, generator=gen)
        mtp[f"mtp.{name}"] = 0.2 * noise if name.endswith("norm.weight") else noise * scale * 1.5 / shape[-1] ** 0.5
    save_file({k: v.contiguous() for k, v in mtp.items()}, path / "model-mtp.safetensors")
    index = {"metadata": {}, "weight_map": {k: "model.safetensors" for k in model} | {k: "model-mtp.safetensors" for k in mtp}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    (path / "config.json").write_text(json.dumps({**config, "mtp_num_hidden_layers": 1}))
    return path


def _stack_experts(shapes: dict) -> dict:
    """Per-expert gate/up/down shapes -> the stacked `experts.gate_up_proj` (E, 2I, H), `experts.down_proj` (E, H, I)."""
    n = len({k for k in shapes if ".experts." in k and k.endswith("down_proj.weight")})
    I, H = shapes["layers.0.mlp.experts.0.gate_proj.weight"]
    kept = {k: v for k, v in shapes.items() if ".experts." not in k}
    return kept | {"layers.0.mlp.experts.gate_up_proj": (n, 2 * I, H), "layers.0.mlp.experts.down_proj": (n, H, I)}
