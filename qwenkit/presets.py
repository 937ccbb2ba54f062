"""Official model shapes: every released Qwen2.5, Qwen2-MoE, Qwen3 and Qwen3-MoE size, and the hybrid
Qwen3-Next and Qwen3.5 sizes whose config.json is named below, as config.json dicts.

Each entry holds the released config.json values (Hugging Face field names) that decide the
model's shape and numerics, so `get_preset(name)` gives the same `QwenConfig` that reading the
checkpoint's own config.json would. Instruct and Coder releases that share a base model's shape
are derived from it, changing only the fields their config.json changes (end-of-sequence token,
context length, norm epsilon).
"""

from __future__ import annotations

from .config import QwenConfig
from .errors import ConfigError

BOS = 151643  # <|endoftext|>: bos of every line, and eos of the base (pretrained-only) releases
IM_END = 151645  # <|im_end|>: eos of the chat releases


def _qwen2(**fields) -> dict:
    return {
        "model_type": "qwen2", "hidden_act": "silu", "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
        "use_sliding_window": False, "bos_token_id": BOS, "eos_token_id": BOS, **fields,
    }


def _qwen2_moe(**fields) -> dict:
    return _qwen2(model_type="qwen2_moe", decoder_sparse_step=1, norm_topk_prob=False, mlp_only_layers=[], **fields)


def _qwen3(**fields) -> dict:
    return {
        "model_type": "qwen3", "hidden_act": "silu", "head_dim": 128, "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6, "max_position_embeddings": 40960, "attention_bias": False,
        "use_sliding_window": False, "vocab_size": 151936, "bos_token_id": BOS, "eos_token_id": IM_END,
        **fields,
    }


def _qwen3_moe(**fields) -> dict:
    return _qwen3(model_type="qwen3_moe", tie_word_embeddings=False, decoder_sparse_step=1,
                  norm_topk_prob=True, mlp_only_layers=[], num_experts=128, num_experts_per_tok=8, **fields)


def _hybrid(model_type: str, **fields) -> dict:
    """The fields every Qwen3-Next / Qwen3.5 text config shares (layer kinds from the interval of 4)."""
    return {"model_type": model_type, "hidden_act": "silu", "head_dim": 256, "rms_norm_eps": 1e-6,
            "attention_bias": False, "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128,
            "linear_value_head_dim": 128, "full_attention_interval": 4, "max_position_embeddings": 262144,
            "tie_word_embeddings": False, **fields}


def _qwen35(model_type: str = "qwen3_5_text", **fields) -> dict:
    """A Qwen3.5 text config: every size shares the vocabulary, rope and DeltaNet key heads."""
    rope = {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25}
    return _hybrid(model_type, vocab_size=248320, linear_num_key_heads=16, rope_parameters=rope, **fields)


def _qwen35_moe(**fields) -> dict:
    return _qwen35("qwen3_5_moe_text", **fields)


PRESETS: dict[str, dict] = {
    # Qwen2.5 base releases (Qwen/Qwen2.5-*)
    "qwen2.5-0.5b": _qwen2(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                           num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                           tie_word_embeddings=True),
    "qwen2.5-1.5b": _qwen2(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                           num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=131072,
                           tie_word_embeddings=True),
    "qwen2.5-3b": _qwen2(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                         num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32768,
                         tie_word_embeddings=True),
    "qwen2.5-7b": _qwen2(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=131072,
                         tie_word_embeddings=False),
    "qwen2.5-14b": _qwen2(vocab_size=152064, hidden_size=5120, intermediate_size=13824, num_hidden_layers=48,
                          num_attention_heads=40, num_key_value_heads=8, max_position_embeddings=131072,
                          tie_word_embeddings=False, rms_norm_eps=1e-5),
    "qwen2.5-32b": _qwen2(vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                          num_attention_heads=40, num_key_value_heads=8, max_position_embeddings=131072,
                          tie_word_embeddings=False, rms_norm_eps=1e-5),
    "qwen2.5-72b": _qwen2(vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                          num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=131072,
                          tie_word_embeddings=False, rms_norm_eps=1e-5),
    # Mixture-of-experts releases of the Qwen2 line (shared expert, qkv bias)
    "qwen1.5-moe-a2.7b": _qwen2_moe(vocab_size=151936, hidden_size=2048, intermediate_size=5632,
                                    num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                                    max_position_embeddings=8192, tie_word_embeddings=False, num_experts=60,
                                    num_experts_per_tok=4, moe_intermediate_size=1408,
                                    shared_expert_intermediate_size=5632),
    "qwen2-57b-a14b": _qwen2_moe(vocab_size=151936, hidden_size=3584, intermediate_size=18944,
                                 num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                                 max_position_embeddings=131072, tie_word_embeddings=False, num_experts=64,
                                 num_experts_per_tok=8, moe_intermediate_size=2560,
                                 shared_expert_intermediate_size=20480),
    # Qwen3 (Qwen/Qwen3-*, the hybrid-thinking releases)
    "qwen3-0.6b": _qwen3(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                         num_key_value_heads=8, tie_word_embeddings=True),
    "qwen3-1.7b": _qwen3(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                         num_key_value_heads=8, tie_word_embeddings=True),
    "qwen3-4b": _qwen3(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                       num_key_value_heads=8, tie_word_embeddings=True),
    "qwen3-8b": _qwen3(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                       num_key_value_heads=8, tie_word_embeddings=False),
    "qwen3-14b": _qwen3(hidden_size=5120, intermediate_size=17408, num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=8, tie_word_embeddings=False),
    "qwen3-32b": _qwen3(hidden_size=5120, intermediate_size=25600, num_hidden_layers=64, num_attention_heads=64,
                        num_key_value_heads=8, tie_word_embeddings=False),
    "qwen3-30b-a3b": _qwen3_moe(hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
                                num_attention_heads=32, num_key_value_heads=4, moe_intermediate_size=768),
    "qwen3-235b-a22b": _qwen3_moe(hidden_size=4096, intermediate_size=12288, num_hidden_layers=94,
                                  num_attention_heads=64, num_key_value_heads=4, moe_intermediate_size=1536),
    # Qwen3-Next: Qwen/Qwen3-Next-80B-A3B-Instruct's config.json ("80B in total and 3B activated"),
    # checked against slime's training script for it (width, layers, heads, experts, rope) and
    # llama.cpp's Qwen3-Coder-Next snapshot (same shape); DeltaNet heads 16 key / 32 value.
    "qwen3-next-80b-a3b": _hybrid("qwen3_next", vocab_size=151936, hidden_size=2048, intermediate_size=5120,
                                  num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=2,
                                  linear_num_key_heads=16, linear_num_value_heads=32, num_experts=512,
                                  num_experts_per_tok=10, moe_intermediate_size=512,
                                  shared_expert_intermediate_size=512, norm_topk_prob=True, decoder_sparse_step=1,
                                  mlp_only_layers=[], rope_theta=10000000.0, partial_rotary_factor=0.25,
                                  bos_token_id=BOS, eos_token_id=IM_END),
    # Qwen3.5 text models (Qwen/Qwen3.5-*, the text_config of each config.json; vision towers not
    # counted). The values as quoted in public code that reads those files: a table of every size
    # in a JAX port of Qwen3.5, the 0.8B's whole config.json (revision 2fc06364), llama.cpp's
    # quantization snapshots (27B, 397B-A17B: width, layers, heads, vocabulary) and slime's training
    # scripts (0.8B, 27B, 35B-A3B); where they overlap they agree. 9B and 35B-A3B are also
    # transformers' Qwen3_5TextConfig / Qwen3_5MoeTextConfig defaults.
    "qwen3.5-0.8b": _qwen35(hidden_size=1024, intermediate_size=3584, num_hidden_layers=24, num_attention_heads=8,
                            num_key_value_heads=2, linear_num_value_heads=16, tie_word_embeddings=True),
    "qwen3.5-2b": _qwen35(hidden_size=2048, intermediate_size=6144, num_hidden_layers=24, num_attention_heads=8,
                          num_key_value_heads=2, linear_num_value_heads=16, tie_word_embeddings=True),
    "qwen3.5-4b": _qwen35(hidden_size=2560, intermediate_size=9216, num_hidden_layers=32, num_attention_heads=16,
                          num_key_value_heads=4, linear_num_value_heads=32, tie_word_embeddings=True),
    "qwen3.5-9b": _qwen35(hidden_size=4096, intermediate_size=12288, num_hidden_layers=32, num_attention_heads=16,
                          num_key_value_heads=4, linear_num_value_heads=32),
    "qwen3.5-27b": _qwen35(hidden_size=5120, intermediate_size=17408, num_hidden_layers=64, num_attention_heads=24,
                           num_key_value_heads=4, linear_num_value_heads=48),
    "qwen3.5-35b-a3b": _qwen35_moe(hidden_size=2048, num_hidden_layers=40, num_attention_heads=16,
                                   num_key_value_heads=2, linear_num_value_heads=32, num_experts=256,
                                   num_experts_per_tok=8, moe_intermediate_size=512,
                                   shared_expert_intermediate_size=512),
    "qwen3.5-122b-a10b": _qwen35_moe(hidden_size=3072, num_hidden_layers=48, num_attention_heads=32,
                                     num_key_value_heads=2, linear_num_value_heads=64, num_experts=256,
                                     num_experts_per_tok=8, moe_intermediate_size=1024,
                                     shared_expert_intermediate_size=1024),
    "qwen3.5-397b-a17b": _qwen35_moe(hidden_size=4096, num_hidden_layers=60, num_attention_heads=32,
                                     num_key_value_heads=2, linear_num_value_heads=64, num_experts=512,
                                     num_experts_per_tok=10, moe_intermediate_size=1024,
                                     shared_expert_intermediate_size=1024),
}


def _chat_release(base: str, **changes) -> dict:
    """A chat release of `base`: same shape, <|im_end|> as eos, the 32K context its config.json states."""
    return {**PRESETS[base], "eos_token_id": IM_END, "max_position_embeddings": 32768, **changes}


# Qwen2.5-*-Instruct: the 14B/32B/72B instruct configs use eps 1e-6 where their base releases use 1e-5.
PRESETS.update({f"{base}-instruct": _chat_release(base, rms_norm_eps=1e-6) for base in (
    "qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b", "qwen2.5-7b", "qwen2.5-14b", "qwen2.5-32b", "qwen2.5-72b")})
# Qwen2.5-Coder sizes whose shape is the general model's (the base Coder releases end on <|endoftext|>).
PRESETS.update({f"qwen2.5-coder-{size}": {**_chat_release(f"qwen2.5-{size}"), "eos_token_id": BOS}
                for size in ("0.5b", "1.5b", "3b", "7b")})
PRESETS.update({f"qwen2.5-coder-{size}-instruct": _chat_release(f"qwen2.5-{size}")
                for size in ("0.5b", "1.5b", "3b", "7b")})


def preset_names() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str) -> QwenConfig:
    """The QwenConfig of an official release, by preset name (case-insensitive; `Qwen/` prefix allowed)."""
    key = name.strip().lower().removeprefix("qwen/")
    if key not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; known presets: {', '.join(preset_names())}")
    return QwenConfig.from_dict(PRESETS[key])
