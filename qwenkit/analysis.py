"""What a model costs, from its config alone: parameters, KV-cache bytes, FLOPs per token, memory plans.

Pure functions of a `QwenConfig` (no weights, no torch). Counts follow the tensors the model
holds: q/k/v biases (Qwen2 lines), per-head q/k RMSNorm (Qwen3 lines), routers, shared experts
and their sigmoid gate (qwen2_moe), and an lm_head only when it is not tied to the embedding.
Hybrid models (Qwen3-Next, Qwen3.5) have gated attention (q_proj twice as wide) in their
full-attention layers only, which alone hold K/V; their Gated DeltaNet layers hold a fixed-size
recurrent state per sequence instead (`state_bytes_per_sequence`).
Sizes are in bytes; "GB" means 10**9 bytes throughout.
"""

from __future__ import annotations


from .config import QwenConfig
from .dtypes import DTYPE_NAMES
from .errors import ConfigError

GB = 10**9
# Bytes per element: the torch dtypes by their full names (the short ones, bf16 ..., resolve through
# dtypes.DTYPE_NAMES) and the storage-only formats a plan may assume.
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1, "float8": 1, "int8": 1, "int4": 0.5}
# CUDA context, allocator slack and kernels' scratch space that every device carries regardless of model.
RUNTIME_OVERHEAD_BYTES = 1 * GB
COMPONENTS = ("embedding", "attention", "linear_attention", "mlp", "moe_experts", "router", "shared_experts", "norms", "lm_head")


def bytes_per_element(dtype: str | float) -> float:
    """Bytes per element of a dtype name ("bf16", "int4", ...) or a number of bytes given directly."""
    if isinstance(dtype, (int, float)):
        return float(dtype)
    key = str(dtype).lower().removeprefix("torch.")
    key = DTYPE_NAMES.get(key, key)
    if key not in DTYPE_BYTES:
        raise ConfigError(f"unknown dtype {dtype!r}; known: {', '.join({**DTYPE_NAMES, **DTYPE_BYTES})}")
    return DTYPE_BYTES[key]


# ---- parameters ----------------------------------------------------------------------------
def _attention_params(cfg: QwenConfig) -> int:
    """One layer's q/k/v/o projections, their biases, and the per-head q/k norms."""
    h, q_dim, kv_dim = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    weights = h * q_dim * (2 if cfg.attn_output_gate else 1) + 2 * h * kv_dim + q_dim * h
    biases = (q_dim + 2 * kv_dim) * cfg.qkv_bias + h * cfg.o_bias
    return weights + biases + 2 * cfg.head_dim * cfg.qk_norm


def _linear_attention_params(cfg: QwenConfig) -> int:
    """One Gated DeltaNet layer: in_proj (q, k, v, z, b, a), the depthwise conv, A_log and dt_bias,
    the gated output norm and out_proj."""
    key, value = cfg.linear_num_key_heads * cfg.linear_key_head_dim, cfg.linear_num_value_heads * cfg.linear_value_head_dim
    conv, nv = 2 * key + value, cfg.linear_num_value_heads
    return cfg.hidden_size * (conv + value + 2 * nv) + conv * cfg.linear_conv_kernel_dim + 2 * nv \
        + cfg.linear_value_head_dim + value * cfg.hidden_size


def _expert_params(cfg: QwenConfig) -> int:
    """One routed expert: gate, up and down projections."""
    return 3 * cfg.hidden_size * cfg.moe_intermediate_size


def _shared_expert_params(cfg: QwenConfig) -> int:
    """The always-on shared expert plus its scalar sigmoid gate (qwen2_moe only)."""
    if not cfg.shared_expert_intermediate_size:
        return 0
    return 3 * cfg.hidden_size * cfg.shared_expert_intermediate_size + cfg.hidden_size


def parameter_counts(cfg: QwenConfig) -> dict[str, int]:
    """Parameters by component, `total`, `non_embedding` (total less embedding and lm_head), and `active`.

    `active` is what one token uses: everything except the routed experts it is not sent to
    (top-k of them per sparse layer). For a dense model it equals `total`.
    """
    h, n_layers = cfg.hidden_size, cfg.num_hidden_layers
    sparse = sum(cfg.is_sparse_layer(i) for i in range(n_layers))
    n_attn = len(cfg.attention_layers)
    counts = {
        "embedding": cfg.vocab_size * h,
        "attention": n_attn * _attention_params(cfg),
        "linear_attention": (n_layers - n_attn) * _linear_attention_params(cfg),
        "mlp": (n_layers - sparse) * 3 * h * cfg.intermediate_size,
        "moe_experts": sparse * cfg.num_experts * _expert_params(cfg),
        "router": sparse * cfg.num_experts * h,
        "shared_experts": sparse * _shared_expert_params(cfg),
        "norms": (2 * n_layers + 1) * h,
        "lm_head": 0 if cfg.tie_word_embeddings else cfg.vocab_size * h,
    }
    counts["total"] = sum(counts[c] for c in COMPONENTS)
    counts["non_embedding"] = counts["total"] - counts["embedding"] - counts["lm_head"]
    idle_experts = sparse * (cfg.num_experts - cfg.num_experts_per_tok) * _expert_params(cfg)
    counts["active"] = counts["total"] - idle_experts
    return counts


# ---- KV cache ------------------------------------------------------------------------------
def kv_cache_bytes_per_token(cfg: QwenConfig, dtype_bytes: float = 2) -> float:
    """K and V for every attention layer: 2 * layers * kv_heads * head_dim * bytes (a hybrid's
    DeltaNet layers keep none)."""
    return 2 * len(cfg.attention_layers) * cfg.num_key_value_heads * cfg.head_dim * dtype_bytes


def state_bytes_per_sequence(cfg: QwenConfig, dtype_bytes: float = 2) -> float:
    """A hybrid's recurrent state, whatever the sequence length: per DeltaNet layer the conv's last
    K-1 inputs (in the model dtype) and the float32 delta-rule state (v heads x d_k x d_v)."""
    n_linear = cfg.num_hidden_layers - len(cfg.attention_layers)
    conv = (2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim
            + cfg.linear_num_value_heads * cfg.linear_value_head_dim) * (cfg.linear_conv_kernel_dim - 1)
    state = cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim
    return n_linear * (conv * dtype_bytes + state * 4)


def kv_cache_bytes(cfg: QwenConfig, context: int, batch: int = 1, dtype_bytes: float = 2) -> float:
    """The KV cache of `batch` sequences each holding `context` tokens."""
    return kv_cache_bytes_per_token(cfg, dtype_bytes) * context * batch


def gqa_saving(cfg: QwenConfig, dtype_bytes: float = 2) -> dict[str, float]:
    """KV bytes per token against a multi-head model of the same shape (kv heads = query heads)."""
    gqa = kv_cache_bytes_per_token(cfg, dtype_bytes)
    mha = kv_cache_bytes_per_token(cfg.replace(num_key_value_heads=cfg.num_attention_heads), dtype_bytes)
    ratio = cfg.num_key_value_heads / cfg.num_attention_heads
    return {"kv_bytes_per_token": gqa, "mha_kv_bytes_per_token": mha, "ratio": ratio, "saving": 1 - ratio}


# ---- compute -------------------------------------------------------------------------------
def _matmul_params_per_token(cfg: QwenConfig) -> int:
    """Weights one token multiplies through: active params less the embedding lookup, norms and biases,
    plus the output projection, which runs even when its weight is the tied embedding."""
    counts = parameter_counts(cfg)
    q_dim, kv_dim = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    biases = (q_dim + 2 * kv_dim) * cfg.qkv_bias + cfg.hidden_size * cfg.o_bias
    n_attn, n_linear = len(cfg.attention_layers), cfg.num_hidden_layers - len(cfg.attention_layers)
    deltanet_vectors = 2 * cfg.linear_num_value_heads + cfg.linear_value_head_dim  # A_log, dt_bias, norm
    not_matmul = counts["norms"] + n_attn * (biases + 2 * cfg.head_dim * cfg.qk_norm) + n_linear * deltanet_vectors
    return counts["active"] - counts["embedding"] - counts["lm_head"] - not_matmul + cfg.vocab_size * cfg.hidden_size


def flops_per_token(cfg: QwenConfig, context_len: int) -> float:
    """Forward FLOPs for one token that attends to `context_len` positions.

    2 FLOPs (multiply + add) per matmul weight the token uses (top-k experts only), plus attention
    itself: q·k over the context and the weighted sum of v, each 2 * heads * head_dim per position
    per layer, i.e. 4 * layers * heads * head_dim * context. For a whole sequence of length T the
    average token attends to about T/2 positions; training costs about 3x this (forward + backward).
    A hybrid's DeltaNet layers cost the same at any context: about 6 * v_heads * d_k * d_v each
    (decay, recall and update of the state, and the read-out).
    """
    n_linear = cfg.num_hidden_layers - len(cfg.attention_layers)
    attention = 4 * len(cfg.attention_layers) * cfg.num_attention_heads * cfg.head_dim * context_len
    recurrent = 6 * n_linear * cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim
    return 2 * _matmul_params_per_token(cfg) + attention + recurrent


# ---- memory plan ---------------------------------------------------------------------------
def _activation_bytes(cfg: QwenConfig, batch: int, chunk: int, act_bytes: float) -> float:
    """Peak transient memory of one prefill chunk: the residual stream, the widest MLP intermediate
    (gate and up halves) and fp32 logits of each sequence's last position."""
    if cfg.is_moe:
        width = cfg.num_experts_per_tok * cfg.moe_intermediate_size + cfg.shared_expert_intermediate_size
    else:
        width = cfg.intermediate_size
    per_token = (2 * cfg.hidden_size + 2 * width) * act_bytes
    return batch * chunk * per_token + batch * cfg.vocab_size * 4


def memory_plan(cfg: QwenConfig, dtype: str | float = "bf16", context: int = 32768, batch: int = 1,
                n_devices: int = 1, device_gb: float = 80, kv_dtype: str | float | None = None,
                prefill_chunk: int = 4096) -> dict:
    """Whether serving `batch` sequences of `context` tokens fits `n_devices` of `device_gb` each.

    Tensor parallelism splits the weights n ways and the KV cache over at most kv_heads devices
    (beyond that KV heads are replicated). Activations are estimated for one prefill chunk and
    counted whole on each device; each device also carries RUNTIME_OVERHEAD_BYTES.
    """
    if n_devices < 1 or batch < 1 or context < 1:
        raise ConfigError(f"memory plan needs n_devices, batch and context >= 1 (got {n_devices}, {batch}, {context})")
    w_bytes, kv_bytes_each = bytes_per_element(dtype), bytes_per_element(dtype if kv_dtype is None else kv_dtype)
    weights = parameter_counts(cfg)["total"] * w_bytes
    kv = kv_cache_bytes(cfg, context, batch, kv_bytes_each)
    activations = _activation_bytes(cfg, batch, min(context, prefill_chunk), w_bytes)
    per_device = {
        "weights": weights / n_devices,
        "kv_cache": kv / min(n_devices, cfg.num_key_value_heads),
        "activations": activations,
        "runtime": RUNTIME_OVERHEAD_BYTES,
    }
    if cfg.is_hybrid:  # split over devices by the DeltaNet's key heads, as the KV cache by its heads
        state = state_bytes_per_sequence(cfg, w_bytes) * batch
        per_device["recurrent_state"] = state / min(n_devices, cfg.linear_num_key_heads)
    total = sum(per_device.values())
    plan = {
        "dtype": dtype, "context": context, "batch": batch, "n_devices": n_devices, "device_gb": device_gb,
        "weights_bytes": weights, "kv_cache_bytes": kv, "activation_bytes": activations,
        "per_device": per_device, "per_device_bytes": total, "fits": total <= device_gb * GB,
    }
    plan["text"] = plan_table(plan)
    return plan


# ---- tables --------------------------------------------------------------------------------
def _gb(n: float) -> str:
    return f"{n / GB:,.2f} GB"


def _billions(n: int) -> str:
    return f"{n / 1e9:,.3f}B" if n >= 1e8 else f"{n / 1e6:,.2f}M"


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def plan_table(plan: dict) -> str:
    """A memory plan as text: what each device holds and whether it fits."""
    n = plan["n_devices"]
    rows = [("setup", f"{plan['batch']} x {plan['context']:,} tokens, {plan['dtype']}, {n} x {plan['device_gb']} GB")]
    rows += [(f"{name} / device", _gb(b)) for name, b in plan["per_device"].items()]
    rows.append(("total / device", _gb(plan["per_device_bytes"])))
    verdict = "yes" if plan["fits"] else f"no (needs {_gb(plan['per_device_bytes'] - plan['device_gb'] * GB)} more)"
    rows.append(("fits", verdict))
    return _table(rows)


def _rope_text(cfg: QwenConfig) -> str:
    rope = cfg.rope
    text = f"{rope['rope_type']}, theta {rope['rope_theta']:g}"
    if rope.get("factor"):
        text += f", factor {rope['factor']:g}"
    if rope.get("partial_rotary_factor"):
        text += f", on {rope['partial_rotary_factor']:g} of each head"
    if rope.get("original_max_position_embeddings") and rope["rope_type"] != "default":
        text += f" from {rope['original_max_position_embeddings']:,}"
    return text


def info_dict(cfg: QwenConfig, dtype: str | float = "bf16") -> dict:
    """The model's shape and costs as plain JSON-ready values."""
    counts = parameter_counts(cfg)
    return {
        "model_type": cfg.model_type,
        "num_parameters": counts["total"],
        "active_parameters": counts["active"],
        "non_embedding_parameters": counts["non_embedding"],
        "parameters": {c: counts[c] for c in COMPONENTS},
        "num_layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "num_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "dtype": dtype,
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(cfg, bytes_per_element(dtype)),
        "state_bytes_per_sequence": state_bytes_per_sequence(cfg, bytes_per_element(dtype)),
        "num_attention_layers": len(cfg.attention_layers),
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope": dict(cfg.rope),
    }


def info_table(cfg: QwenConfig, name: str = "", dtype: str | float = "bf16") -> str:
    """A readable summary of shape, parameters by component and KV-cache cost."""
    info, kv = info_dict(cfg, dtype), kv_cache_bytes_per_token(cfg, bytes_per_element(dtype))
    n_attn = len(cfg.attention_layers)
    layers = str(cfg.num_hidden_layers) if not cfg.is_hybrid else \
        f"{cfg.num_hidden_layers} ({cfg.num_hidden_layers - n_attn} Gated DeltaNet, {n_attn} gated attention)"
    rows = [("model", f"{name or '(unnamed)'} ({cfg.model_type})"),
            ("layers", layers),
            ("heads / kv heads", f"{cfg.num_attention_heads} / {cfg.num_key_value_heads}"),
            ("head_dim", str(cfg.head_dim)),
            ("hidden", str(cfg.hidden_size)),
            ("intermediate", str(cfg.intermediate_size))]
    if cfg.is_moe:
        shared = f", shared {cfg.shared_expert_intermediate_size}" if cfg.shared_expert_intermediate_size else ""
        rows.append(("experts", f"{cfg.num_experts} ({cfg.num_experts_per_tok} active), "
                                f"intermediate {cfg.moe_intermediate_size}{shared}"))
    rows += [(f"params: {c}", _billions(n)) for c, n in info["parameters"].items() if n]
    rows += [("params: total", _billions(info["num_parameters"])),
             ("params: active / token", _billions(info["active_parameters"])),
             (f"KV cache / token ({dtype})", f"{kv:,.0f} bytes"),
             ("KV cache at 32K", _gb(kv * 32768)),
             ("KV cache at 128K", _gb(kv * 131072))]
    if cfg.is_hybrid:
        rows += [("DeltaNet heads (k / v)", f"{cfg.linear_num_key_heads} / {cfg.linear_num_value_heads} "
                                            f"x {cfg.linear_key_head_dim}/{cfg.linear_value_head_dim}"),
                 (f"recurrent state / sequence ({dtype} conv, fp32 state)",
                  f"{info['state_bytes_per_sequence']:,.0f} bytes, at any length")]
    rows += [("context length", f"{cfg.max_position_embeddings:,}"), ("rope", _rope_text(cfg))]
    return _table(rows)
