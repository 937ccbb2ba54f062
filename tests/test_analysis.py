"""Parameter breakdowns, KV-cache sizes, FLOPs and memory plans computed from configs."""

import json

import pytest

from qwenkit.analysis import (
    COMPONENTS, GB, bytes_per_element, flops_per_token, gqa_saving, info_dict, info_table,
    kv_cache_bytes, kv_cache_bytes_per_token, memory_plan, parameter_counts, plan_table,
)
from qwenkit.errors import ConfigError
from qwenkit.presets import get_preset


def test_kv_bytes_per_token_of_qwen25_05b_bf16():
    cfg = get_preset("qwen2.5-0.5b")
    assert kv_cache_bytes_per_token(cfg) == 2 * 24 * 2 * 64 * 2 == 12288
    assert kv_cache_bytes(cfg, context=1000, batch=3) == 12288 * 3000
    assert kv_cache_bytes_per_token(cfg, bytes_per_element("fp32")) == 2 * 12288


def test_gqa_saving_against_multi_head_attention():
    saving = gqa_saving(get_preset("qwen2.5-0.5b"))
    assert saving["ratio"] == pytest.approx(2 / 14)
    assert saving["mha_kv_bytes_per_token"] == 2 * 24 * 14 * 64 * 2
    assert saving["kv_bytes_per_token"] / saving["mha_kv_bytes_per_token"] == pytest.approx(2 / 14)


def test_components_sum_to_total_and_dense_models_are_all_active():
    counts = parameter_counts(get_preset("qwen2.5-7b"))
    assert sum(counts[c] for c in COMPONENTS) == counts["total"] == counts["active"]
    assert counts["moe_experts"] == counts["router"] == counts["shared_experts"] == 0
    assert counts["lm_head"] == counts["embedding"] == 152064 * 3584


def test_tied_model_has_no_lm_head_and_qwen3_counts_its_qk_norms():
    counts = parameter_counts(get_preset("qwen3-0.6b"))
    assert counts["lm_head"] == 0
    q, kv, o = 1024 * 2048, 2 * 1024 * 1024, 2048 * 1024
    assert counts["attention"] == 28 * (q + kv + o + 2 * 128)


def test_moe_active_counts_only_routed_top_k():
    cfg = get_preset("qwen2-57b-a14b")
    counts = parameter_counts(cfg)
    per_expert = 3 * 3584 * 2560
    assert counts["total"] - counts["active"] == 28 * (64 - 8) * per_expert
    assert counts["shared_experts"] == 28 * (3 * 3584 * 20480 + 3584)


def test_flops_per_token_is_twice_the_matmul_weights_plus_attention():
    cfg = get_preset("qwen2.5-0.5b")
    h, i, v, layers = 896, 4864, 151936, 24
    matmul = layers * (h * 896 + 2 * h * 128 + 896 * h + 3 * h * i) + v * h  # tied lm_head still multiplies
    assert flops_per_token(cfg, 0) == 2 * matmul
    assert flops_per_token(cfg, 1000) - flops_per_token(cfg, 0) == 4 * layers * 14 * 64 * 1000


def test_moe_flops_follow_active_not_total_parameters():
    counts = parameter_counts(get_preset("qwen3-30b-a3b"))
    not_matmul = counts["embedding"] + counts["norms"] + 48 * 2 * 128  # lookup, RMSNorm and q/k-norm weights
    assert flops_per_token(get_preset("qwen3-30b-a3b"), 0) == 2 * (counts["active"] - not_matmul)
    assert flops_per_token(get_preset("qwen3-30b-a3b"), 0) < counts["total"] / 4


def test_72b_bf16_needs_two_80gb_devices_at_small_context():
    cfg = get_preset("qwen2.5-72b")
    one = memory_plan(cfg, "bf16", context=4096, batch=1, n_devices=1, device_gb=80)
    two = memory_plan(cfg, "bf16", context=4096, batch=1, n_devices=2, device_gb=80)
    assert not one["fits"] and two["fits"]
    assert one["weights_bytes"] == parameter_counts(cfg)["total"] * 2
    assert two["per_device"]["weights"] == one["weights_bytes"] / 2


def test_long_context_kv_cache_can_break_a_plan():
    cfg = get_preset("qwen2.5-72b")
    plan = memory_plan(cfg, "bf16", context=131072, batch=1, n_devices=2, device_gb=80)
    assert plan["kv_cache_bytes"] == 327680 * 131072
    assert not plan["fits"]
    assert memory_plan(cfg, "int4", context=131072, n_devices=2, device_gb=80, kv_dtype="bf16")["fits"]


def test_kv_cache_splits_over_at_most_kv_heads_devices():
    plan = memory_plan(get_preset("qwen2.5-0.5b"), context=8192, n_devices=8, device_gb=24)
    assert plan["per_device"]["kv_cache"] == plan["kv_cache_bytes"] / 2
    assert plan["per_device_bytes"] < 24 * GB and plan["fits"]


def test_plan_table_says_whether_it_fits():
    plan = memory_plan(get_preset("qwen2.5-72b"), context=4096, n_devices=1)
    assert plan["text"] == plan_table(plan)
    assert "weights / device" in plan["text"] and "fits" in plan["text"] and "no (needs" in plan["text"]


def test_info_dict_has_the_cli_keys_and_is_json():
    info = info_dict(get_preset("qwen2.5-0.5b"), dtype="bf16")
    for key in ("num_parameters", "num_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "kv_cache_bytes_per_token", "max_position_embeddings", "active_parameters", "parameters"):
        assert key in info
    assert info["kv_cache_bytes_per_token"] == 12288 and info["num_parameters"] == 494_032_768
    assert set(info["parameters"]) == set(COMPONENTS)
    json.dumps(info)


def test_info_table_lists_shape_parameters_and_kv_cache():
    text = info_table(get_preset("qwen3-30b-a3b"), name="qwen3-30b-a3b")
    for label in ("layers", "heads / kv heads", "head_dim", "experts", "params: moe_experts",
                  "params: active / token", "KV cache at 32K", "KV cache at 128K", "context length", "rope"):
        assert label in text
    yarn = get_preset("qwen3-8b").replace(rope={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                                "original_max_position_embeddings": 32768})
    assert "yarn, theta 1e+06, factor 4 from 32,768" in info_table(yarn)


def test_unknown_dtype_is_a_config_error():
    with pytest.raises(ConfigError, match="fp5"):
        bytes_per_element("fp5")
    with pytest.raises(ConfigError):
        memory_plan(get_preset("qwen2.5-0.5b"), n_devices=0)
