"""Hybrid GGUF files (qwen3next, qwen35, qwen35moe) written the way llama.cpp's converter writes
them, with the `gguf` package, from the tiny transformers checkpoints, and loaded back."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGUFWriter
from safetensors.torch import load_file

import qwenkit
from hybrid_tiny import make_hybrid
from tiny import rel_diff

ARCH = {"qwen3_next": "qwen3next", "qwen3_5_text": "qwen35", "qwen3_5_moe_text": "qwen35moe"}
LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
         "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "mlp.gate": "ffn_gate_inp",
         "mlp.shared_expert.gate_proj": "ffn_gate_shexp", "mlp.shared_expert.up_proj": "ffn_up_shexp",
         "mlp.shared_expert.down_proj": "ffn_down_shexp", "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
         "linear_attn.in_proj_qkv": "attn_qkv", "linear_attn.in_proj_z": "attn_gate", "linear_attn.in_proj_ba": "ssm_ba",
         "linear_attn.in_proj_b": "ssm_beta", "linear_attn.in_proj_a": "ssm_alpha", "linear_attn.conv1d": "ssm_conv1d",
         "linear_attn.norm": "ssm_norm", "linear_attn.out_proj": "ssm_out"}


def _tiled(t: torch.Tensor, dim: int, nk: int, d: int) -> torch.Tensor:
    """Value heads grouped by key head -> tiled (the converter's qwen35 order)."""
    shape = list(t.shape)
    t = t.reshape(*shape[:dim], nk, shape[dim] // (nk * d), d, *shape[dim + 1:])
    return t.transpose(dim, dim + 1).reshape(shape)


def _convert(name: str, t: torch.Tensor, cfg: dict, arch: str):
    """(gguf name, values) pairs for one checkpoint tensor, as the converter makes them."""
    nk, nv, dk, dv = (cfg[f"linear_{k}"] for k in ("num_key_heads", "num_value_heads", "key_head_dim", "value_head_dim"))
    if name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight"):
        t = t + 1
    if arch != "qwen3next" and ".linear_attn." in name:  # qwen35: value heads tiled
        qk = 2 * nk * dk
        if "in_proj_qkv" in name or "conv1d" in name:
            t = torch.cat([t[:qk], _tiled(t[qk:], 0, nk, dv)])
        elif "in_proj_z" in name:
            t = _tiled(t, 0, nk, dv)
        elif any(k in name for k in ("in_proj_b.", "in_proj_a.", "A_log", "dt_bias")):
            t = _tiled(t, 0, nk, 1)
        elif "out_proj" in name:
            t = _tiled(t, 1, nk, dv)
    if name == "model.embed_tokens.weight":
        return [("token_embd.weight", t)]
    if name == "model.norm.weight":
        return [("output_norm.weight", t)]
    if name == "lm_head.weight":
        return [("output.weight", t)]
    layer, rest = name.removeprefix("model.layers.").split(".", 1)
    b = f"blk.{layer}."
    if rest.endswith("A_log"):
        return [(b + "ssm_a", -torch.exp(t))]
    if rest.endswith("dt_bias"):
        return [(b + "ssm_dt.bias", t)]
    if "conv1d" in rest:
        t = t.squeeze(1)
    if rest.endswith("in_proj_qkvz.weight"):  # [q k v z] per key head -> [q.. | k.. | v..] and z
        q, k, v, z = t.reshape(nk, -1, t.shape[-1]).split((dk, dk, nv // nk * dv, nv // nk * dv), dim=1)
        flat = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731
        return [(b + "attn_qkv.weight", torch.cat([flat(q), flat(k), flat(v)])), (b + "attn_gate.weight", flat(z))]
    if ".experts." in rest:
        kind = rest.split(".")[-2]  # experts.3.gate_proj.weight
        return [(b + f"ffn_{kind.removesuffix('_proj')}_exps.weight:{rest.split('.')[2]}", t)]
    if rest == "mlp.shared_expert_gate.weight":
        t = t.reshape(-1)
    stem, suffix = rest.rsplit(".", 1)
    return [(b + f"{LAYER[stem]}.{suffix}", t)]


def write_hybrid_gguf(ckpt, path, arch_hf: str, nextn: dict | None = None) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    arch = ARCH[arch_hf]
    tensors, experts = {}, {}
    for name, t in load_file(ckpt / "model.safetensors").items():
        for gname, value in _convert(name, t.float(), cfg, arch):
            if ":" in gname:  # one expert of a stack
                stack, e = gname.split(":")
                experts.setdefault(stack, {})[int(e)] = value
            else:
                tensors[gname] = value
    tensors |= {stack: torch.stack([es[e] for e in sorted(es)]) for stack, es in experts.items()}
    tensors |= nextn or {}
    w = GGUFWriter(str(path), arch)
    n, head_dim = cfg["num_hidden_layers"], cfg["head_dim"]
    w.add_block_count(n + (1 if nextn else 0))
    if nextn:
        w.add_nextn_predict_layers(1)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg.get("intermediate_size", 0))
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    if "num_experts" in cfg:
        w.add_expert_count(cfg["num_experts"])
        w.add_expert_used_count(cfg["num_experts_per_tok"])
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
    w.add_ssm_conv_kernel(cfg["linear_conv_kernel_dim"])
    w.add_ssm_state_size(cfg["linear_key_head_dim"])
    w.add_ssm_group_count(cfg["linear_num_key_heads"])
    w.add_ssm_time_step_rank(cfg["linear_num_value_heads"])
    w.add_ssm_inner_size(cfg["linear_value_head_dim"] * cfg["linear_num_value_heads"])
    w.add_full_attention_interval(4)
    w.add_rope_dimension_count(int(head_dim * cfg["rope_parameters"]["partial_rotary_factor"]))
    w.add_token_list([f"t{i}" for i in range(cfg["vocab_size"])])
    w.add_eos_token_id(cfg["vocab_size"] - 1)
    for name, t in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(t.numpy().astype(np.float32)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch", list(ARCH))
def test_gguf_as_llama_cpp_writes_it_loads_with_equal_logits(tmp_path, arch):
    ckpt = make_hybrid(tmp_path / "ckpt", arch)
    mtp = {"blk.4.nextn.eh_proj.weight": torch.randn(64, 128)} if arch == "qwen3_5_text" else None
    write_hybrid_gguf(ckpt, tmp_path / "model.gguf", arch, nextn=mtp)
    ours = qwenkit.load_model(tmp_path / "model.gguf", dtype=torch.float32)
    ref = qwenkit.load_model(ckpt, dtype=torch.float32)
    assert ours.config.layer_types == ref.config.layer_types and ours.config.model_type == arch
    if mtp:
        assert list(ours.mtp_weights) == ["mtp.blk.4.nextn.eh_proj.weight"]
    ids = torch.randint(0, 256, (1, 70), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel_diff(ours(ids), ref(ids)) < 1e-5  # norms +1 -1 and A through -exp/log: float32 rounding
