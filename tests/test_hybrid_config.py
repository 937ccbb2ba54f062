"""Hybrid config.json fields read as transformers reads them, and written back."""

from __future__ import annotations

import pytest
import transformers

from qwenkit.config import QwenConfig
from qwenkit.errors import ConfigError
from qwenkit.presets import get_preset

TEXT = {"model_type": "qwen3_5_text", "hidden_size": 64, "num_hidden_layers": 6, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "linear_num_key_heads": 2, "linear_num_value_heads": 4}


def test_layer_kinds_rotary_and_defaults_as_transformers_reads_them():
    for fields in (TEXT, {**TEXT, "full_attention_interval": 3, "partial_rotary_factor": 0.5},
                   {**TEXT, "model_type": "qwen3_next", "rope_theta": 5e6}):
        ours = QwenConfig.from_dict(fields)
        ref = transformers.AutoConfig.for_model(**fields)
        assert list(ours.layer_types) == ref.layer_types
        assert ours.rotary_dim == int(ref.head_dim * ref.rope_parameters["partial_rotary_factor"])
        assert ours.rope["rope_theta"] == ref.rope_parameters["rope_theta"]
        assert (ours.linear_key_head_dim, ours.linear_conv_kernel_dim) == (ref.linear_key_head_dim, ref.linear_conv_kernel_dim)


def test_multimodal_config_reads_its_text_part_with_the_outer_fields():
    cfg = QwenConfig.from_dict({"model_type": "qwen3_5_moe", "tie_word_embeddings": True,
                                "text_config": {**TEXT, "model_type": "qwen3_5_moe_text", "num_experts": 4,
                                                "num_experts_per_tok": 2, "norm_topk_prob": False},
                                "vision_config": {"depth": 2}})
    assert cfg.model_type == "qwen3_5_moe_text" and cfg.tie_word_embeddings and cfg.norm_topk_prob
    assert all(cfg.is_sparse_layer(i) for i in range(6))


def test_bad_head_counts_and_layer_lists_name_the_field():
    with pytest.raises(ConfigError, match="linear_num_value_heads"):
        QwenConfig.from_dict({**TEXT, "linear_num_value_heads": 3})
    with pytest.raises(ConfigError, match="layer_types"):
        QwenConfig.from_dict({**TEXT, "layer_types": ["linear_attention"] * 5})


@pytest.mark.parametrize("name", ["qwen3-next-80b-a3b", "qwen3.5-9b", "qwen3.5-35b-a3b"])
def test_written_config_reads_back_the_same_here_and_in_transformers(name):
    cfg = get_preset(name)
    written = cfg.to_hf_dict()
    assert QwenConfig.from_dict(written) == cfg
    ref = transformers.AutoConfig.for_model(**written)
    assert ref.layer_types == list(cfg.layer_types) and ref.rope_parameters["partial_rotary_factor"] == 0.25
