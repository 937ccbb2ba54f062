"""GGUF files of the hybrid architectures (qwen3next, qwen35, qwen35moe), as llama.cpp's converter
writes them, read back into Hugging Face names, values and config fields.

What the converter changes, and what this module undoes:
- names: the DeltaNet's projections become attn_qkv (q, k, v rows), attn_gate (z), ssm_ba
  (qwen3next: b and a interleaved per key head, as in the checkpoint), ssm_beta / ssm_alpha
  (qwen35), ssm_conv1d, ssm_dt.bias (dt_bias), ssm_a, ssm_norm, ssm_out; the second norm is
  post_attention_norm.
- values: every RMSNorm but ssm_norm is stored with 1 added (llama.cpp multiplies by the weight);
  ssm_a holds -exp(A_log); ssm_conv1d is (channels, K) without the middle axis. qwen35/qwen35moe
  with fewer key than value heads store the value heads tiled ([k0 k1 .. k0 k1 ..]) instead of
  grouped by key head ([k0 k0 .. k1 k1 ..]) in every tensor indexed by value head.
- multi-token prediction: layers past block_count - nextn_predict_layers; kept aside (`mtp.` names).
Layer kinds come from the tensors present (ssm_a: a DeltaNet layer), not from the interval key.
"""

from __future__ import annotations

import re

import torch

ARCHS = {"qwen3next": "qwen3_next", "qwen35": "qwen3_5_text", "qwen35moe": "qwen3_5_moe_text"}

LAYER_NAMES = {
    "post_attention_norm": "post_attention_layernorm",
    "attn_qkv": "linear_attn.in_proj_qkv",
    "attn_gate": "linear_attn.in_proj_z",
    "ssm_ba": "linear_attn.in_proj_ba",
    "ssm_beta": "linear_attn.in_proj_b",
    "ssm_alpha": "linear_attn.in_proj_a",
    "ssm_conv1d": "linear_attn.conv1d",
    "ssm_norm": "linear_attn.norm",
    "ssm_out": "linear_attn.out_proj",
}
# Parameters without a .weight suffix, in GGUF and in the checkpoint.
BARE_NAMES = {"ssm_a": "linear_attn.A_log", "ssm_dt.bias": "linear_attn.dt_bias"}
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")
_ONE_ADDED = re.compile(r"(^output_norm|attn_norm|post_attention_norm|attn_q_norm|attn_k_norm)\.weight$")


def hf_name(gguf_name: str, n_layers: int, general) -> str:
    """The checkpoint name of a hybrid file's tensor; `general` maps the names all lines share."""
    m = _BLOCK.fullmatch(gguf_name)
    if m and int(m[1]) >= n_layers:
        return f"mtp.{gguf_name}"
    if m and m[2] in BARE_NAMES:
        return f"model.layers.{m[1]}.{BARE_NAMES[m[2]]}"
    if m:
        part, _, suffix = m[2].rpartition(".")
        if part in LAYER_NAMES:
            return f"model.layers.{m[1]}.{LAYER_NAMES[part]}.{suffix}"
        if part == "ffn_gate_up_exps":
            return f"model.layers.{m[1]}.mlp.experts.gate_up_proj"
    return general(gguf_name)


def config_fields(arch: str, meta: dict, shapes: dict) -> dict:
    """The config.json fields a hybrid GGUF file implies, beyond those every line shares."""
    get = lambda key, default=None: meta.get(f"{arch}.{key}", default)  # noqa: E731
    nextn = get("nextn_predict_layers", 0)
    n = get("block_count") - nextn
    linear = [f"blk.{i}.ssm_a" in shapes for i in range(n)]
    first_attn = linear.index(False) if False in linear else 0
    kv_heads = get("attention.head_count_kv") or get("attention.head_count")
    k_rows = shapes.get(f"blk.{first_attn}.attn_k.weight", (0, 0))[1]
    head_dim = get("attention.key_length") or k_rows // kv_heads
    value_heads = get("ssm.time_step_rank")
    fields = {
        "num_hidden_layers": n, "mtp_num_hidden_layers": nextn, "head_dim": head_dim,
        "layer_types": ["linear_attention" if lin else "full_attention" for lin in linear],
        "linear_conv_kernel_dim": get("ssm.conv_kernel"), "linear_key_head_dim": get("ssm.state_size"),
        "linear_num_key_heads": get("ssm.group_count"), "linear_num_value_heads": value_heads,
        "linear_value_head_dim": get("ssm.inner_size") // value_heads,
        "partial_rotary_factor": get("rope.dimension_count", head_dim) / head_dim,
    }
    if "expert_count" in {k.split(".", 1)[1] for k in meta if k.startswith(arch + ".")}:
        width = lambda name: shapes[name][1] if name in shapes else None  # noqa: E731  GGUF [hidden, ffn]
        fields |= {"num_experts": get("expert_count"), "num_experts_per_tok": get("expert_used_count"),
                   "moe_intermediate_size": get("expert_feed_forward_length"),
                   "shared_expert_intermediate_size": get("expert_shared_feed_forward_length")
                   or width(f"blk.{first_attn}.ffn_gate_shexp.weight"),
                   "norm_topk_prob": bool(get("expert_weights_norm", True)), "decoder_sparse_step": 1,
                   "mlp_only_layers": [i for i in range(n) if f"blk.{i}.ffn_gate_inp.weight" not in shapes]}
    return fields


def restore(gguf_name: str, tensor: torch.Tensor, arch: str, cfg: dict) -> torch.Tensor:
    """The checkpoint's values of a tensor the converter changed (float32 in, float32 out)."""
    if _ONE_ADDED.search(gguf_name):
        return tensor - 1.0
    if gguf_name.endswith(".ssm_a"):
        tensor = torch.log(-tensor)
    elif gguf_name.endswith("ssm_conv1d.weight"):
        tensor = tensor.reshape(tensor.shape[0], 1, -1)  # (C, 1, K)
    return _group_value_heads(gguf_name, tensor, arch, cfg)


def _group_value_heads(gguf_name: str, tensor: torch.Tensor, arch: str, cfg: dict) -> torch.Tensor:
    """qwen35's tiled value-head order back to the checkpoint's grouped one, where it differs."""
    nk, nv = cfg["linear_num_key_heads"], cfg["linear_num_value_heads"]
    if arch == "qwen3next" or nk == nv:
        return tensor
    dk, dv = cfg["linear_key_head_dim"], cfg["linear_value_head_dim"]
    m = _BLOCK.fullmatch(gguf_name)
    part = m[2].removesuffix(".weight").removesuffix(".bias") if m else gguf_name  # attn_qkv, ssm_a, ..
    if part in ("attn_qkv", "ssm_conv1d"):
        qk = 2 * nk * dk
        return torch.cat([tensor[:qk], _grouped(tensor[qk:], 0, nk, dv)])
    if part == "attn_gate":
        return _grouped(tensor, 0, nk, dv)
    if part in ("ssm_beta", "ssm_alpha", "ssm_a", "ssm_dt"):
        return _grouped(tensor, 0, nk, 1)
    if part == "ssm_out":
        return _grouped(tensor, 1, nk, dv)
    return tensor


def _grouped(t: torch.Tensor, dim: int, nk: int, d: int) -> torch.Tensor:
    """Along `dim`, blocks of d ordered (value index, key head) -> (key head, value index)."""
    shape = list(t.shape)
    r = shape[dim] // (nk * d)
    t = t.reshape(*shape[:dim], r, nk, d, *shape[dim + 1:])
    return t.transpose(dim, dim + 1).reshape(shape)
