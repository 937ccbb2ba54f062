"""Every preset has the released shape: parameter totals match transformers and the published sizes."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from qwenkit.analysis import parameter_counts
from qwenkit.errors import ConfigError
from qwenkit.presets import PRESETS, get_preset, preset_names

# Sizes the model cards publish (billions, as printed: the last digit is truncated or rounded).
# Qwen2.5-32B's card prints 32.5B, which neither its config.json nor the hub's safetensors count
# (32.8B) gives; the hub figure is used. Qwen3-0.6B's 0.6B counts its tied embedding once.
PUBLISHED_TOTAL = {
    "qwen2.5-0.5b": "0.49", "qwen2.5-1.5b": "1.54", "qwen2.5-3b": "3.09", "qwen2.5-7b": "7.61",
    "qwen2.5-14b": "14.7", "qwen2.5-32b": "32.8", "qwen2.5-72b": "72.7",
    "qwen1.5-moe-a2.7b": "14.3", "qwen2-57b-a14b": "57",
    "qwen3-0.6b": "0.6", "qwen3-1.7b": "1.7", "qwen3-4b": "4.0", "qwen3-8b": "8.2", "qwen3-14b": "14.8",
    "qwen3-32b": "32.8", "qwen3-30b-a3b": "30.5", "qwen3-235b-a22b": "235",
    # The hybrids' cards state the size of their names (Qwen3.5's also counts a vision tower of
    # 0.1-0.4B, not counted here; each text total still lies within the printed digit).
    "qwen3-next-80b-a3b": "80", "qwen3.5-0.8b": "0.8", "qwen3.5-2b": "2", "qwen3.5-4b": "4", "qwen3.5-9b": "9",
    "qwen3.5-27b": "27", "qwen3.5-35b-a3b": "35", "qwen3.5-122b-a10b": "122", "qwen3.5-397b-a17b": "397",
}
PUBLISHED_ACTIVE = {"qwen1.5-moe-a2.7b": "2.7", "qwen2-57b-a14b": "14", "qwen3-30b-a3b": "3.3", "qwen3-235b-a22b": "22",
                    "qwen3-next-80b-a3b": "3", "qwen3.5-35b-a3b": "3", "qwen3.5-122b-a10b": "10",
                    "qwen3.5-397b-a17b": "17"}
# Exact element counts of the released safetensors (Hugging Face hub model API).
HUB_ELEMENTS = {"qwen2.5-0.5b": 494_032_768, "qwen2.5-7b": 7_615_616_512, "qwen2.5-72b": 72_706_203_648}
# The sparse-step rules below are the qwen2_moe/qwen3_moe lines' (Qwen3.5-MoE makes every layer sparse).
MOE_PRESETS = [n for n in PRESETS if PRESETS[n].get("num_experts") and not get_preset(n).is_hybrid]


def hf_parameter_count(config_json: dict) -> int:
    """Parameters of the transformers model built from a config.json, on the meta device (no memory)."""
    config = AutoConfig.for_model(**config_json)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


def shape(cfg) -> tuple:
    return (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.vocab_size, cfg.tie_word_embeddings)


def within_published(count: float, published: str) -> bool:
    unit = 10 ** -len(published.partition(".")[2])
    return abs(count / 1e9 - float(published)) <= unit


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_total_matches_transformers(name):
    assert parameter_counts(get_preset(name))["total"] == hf_parameter_count(PRESETS[name])


@pytest.mark.parametrize("name", MOE_PRESETS)
def test_scaled_down_moe_matches_transformers(name):
    # Dense layers among sparse ones exercise both the decoder_sparse_step and mlp_only_layers rules.
    small = {**PRESETS[name], "num_hidden_layers": 6, "num_experts": 8, "num_experts_per_tok": 2,
             "decoder_sparse_step": 2, "mlp_only_layers": [1, 3], "vocab_size": 1000}
    cfg = get_preset(name).replace(num_hidden_layers=6, num_experts=8, num_experts_per_tok=2,
                                   decoder_sparse_step=2, mlp_only_layers=(1, 3), vocab_size=1000)
    counts = parameter_counts(cfg)
    assert counts["mlp"] > 0 and counts["moe_experts"] > 0
    assert counts["total"] == hf_parameter_count(small)


@pytest.mark.parametrize("name", sorted(PUBLISHED_TOTAL))
def test_total_matches_published_size(name):
    assert within_published(parameter_counts(get_preset(name))["total"], PUBLISHED_TOTAL[name])


@pytest.mark.parametrize("name", sorted(PUBLISHED_ACTIVE))
def test_active_matches_published_size(name):
    assert within_published(parameter_counts(get_preset(name))["active"], PUBLISHED_ACTIVE[name])


@pytest.mark.parametrize("name", sorted(HUB_ELEMENTS))
def test_total_matches_hub_element_count(name):
    assert parameter_counts(get_preset(name))["total"] == HUB_ELEMENTS[name]


def test_qwen25_shapes_are_the_released_ones():
    small, large = get_preset("qwen2.5-0.5b"), get_preset("qwen2.5-72b")
    assert shape(small) == (24, 896, 14, 2, 4864, 151936, True)
    assert shape(large) == (80, 8192, 64, 8, 29568, 152064, False)
    assert small.qkv_bias and not small.qk_norm


def test_qwen3_shapes_are_the_released_ones():
    tiny, moe = get_preset("qwen3-0.6b"), get_preset("qwen3-235b-a22b")
    assert shape(tiny) == (28, 1024, 16, 8, 3072, 151936, True) and tiny.head_dim == 128
    assert (moe.num_hidden_layers, moe.num_attention_heads, moe.num_key_value_heads, moe.hidden_size,
            moe.num_experts, moe.num_experts_per_tok, moe.moe_intermediate_size) == (94, 64, 4, 4096, 128, 8, 1536)
    assert tiny.qk_norm and not tiny.qkv_bias and moe.shared_expert_intermediate_size == 0


def test_hybrid_shapes_are_the_released_ones():
    # (layers, width, heads, KV heads, DeltaNet key / value heads, experts, top-k, tied): llama.cpp's
    # snapshots give the 27B and 397B-A17B widths, layers and heads; the rest their config.json.
    def hybrid(name):
        c = get_preset(name)
        return (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
                c.linear_num_key_heads, c.linear_num_value_heads, c.num_experts, c.num_experts_per_tok,
                c.tie_word_embeddings)
    assert hybrid("qwen3.5-0.8b") == (24, 1024, 8, 2, 16, 16, 0, 0, True)
    assert hybrid("qwen3.5-27b") == (64, 5120, 24, 4, 16, 48, 0, 0, False)
    assert hybrid("qwen3.5-397b-a17b") == (60, 4096, 32, 2, 16, 64, 512, 10, False)
    assert hybrid("qwen3-next-80b-a3b") == (48, 2048, 16, 2, 16, 32, 512, 10, False)
    for name in ("qwen3.5-0.8b", "qwen3.5-122b-a10b", "qwen3-next-80b-a3b"):
        c = get_preset(name)
        assert c.layer_types == tuple("full_attention" if i % 4 == 3 else "linear_attention"
                                      for i in range(c.num_hidden_layers))
        assert c.head_dim == 256 and c.vocab_size == (151936 if "next" in name else 248320)


def test_chat_and_coder_releases_share_the_base_shape():
    shape = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "tie_word_embeddings")
    base, coder = PRESETS["qwen2.5-0.5b"], PRESETS["qwen2.5-coder-0.5b-instruct"]
    assert {k: base[k] for k in shape} == {k: coder[k] for k in shape}
    assert get_preset("qwen2.5-coder-0.5b-instruct").eos_token_id == (151645,)
    assert get_preset("qwen2.5-0.5b").eos_token_id == (151643,)


def test_get_preset_is_case_insensitive_and_accepts_the_hub_prefix():
    assert get_preset("Qwen/Qwen2.5-Coder-0.5B-Instruct") == get_preset("qwen2.5-coder-0.5b-instruct")
    assert get_preset("QWEN3-8B").hidden_size == 4096


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(ConfigError, match="qwen2.5-0.5b.*qwen3-8b"):
        get_preset("qwen9-1b")
    assert preset_names() == sorted(PRESETS)
