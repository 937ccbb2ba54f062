"""QwenConfig: the model config with Hugging Face field names, read from any released spelling.

`QwenConfig.from_dict(config_json)` accepts a config.json of the qwen2, qwen2_moe, qwen3 and
qwen3_moe lines and of the hybrid lines (qwen3_next; qwen3_5_text and qwen3_5_moe_text, also as the
text part of a qwen3_5 / qwen3_5_moe checkpoint), ignores keys it does not use, and normalises
the rope settings (which have been spelled `rope_scaling` with `type` or `rope_type`,
`rope_parameters`, and `rope_theta` and `partial_rotary_factor` at the top level) into one `rope`
dict. The object is frozen: nothing mutates a config after construction.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

HYBRID_TYPES = ("qwen3_next", "qwen3_5_text", "qwen3_5_moe_text")
MODEL_TYPES = ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe", *HYBRID_TYPES)
# Multimodal checkpoints whose text part is one of the above (their vision tower is skipped).
TEXT_PART = {"qwen3_5": "qwen3_5_text", "qwen3_5_moe": "qwen3_5_moe_text"}
ROPE_TYPES = ("default", "linear", "dynamic", "yarn")


@dataclass(frozen=True)
class QwenConfig:
    model_type: str = "qwen2"
    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    head_dim: int = 0  # 0: hidden_size // num_attention_heads (set in __post_init__)
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    # Attention flavour: Qwen2.x has q/k/v biases; Qwen3 normalises q and k per head instead.
    qkv_bias: bool = True
    o_bias: bool = False
    qk_norm: bool = False
    # Rope, normalised: {"rope_type", "rope_theta", "factor", "original_max_position_embeddings", ...}
    rope: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 1e6})
    # Sliding-window attention (off in every released Qwen checkpoint, kept for parity).
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    # Mixture of experts (num_experts == 0: dense).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    # Hybrid models (Qwen3-Next, Qwen3.5): layer_types holds "linear_attention" for the Gated
    # DeltaNet layers; full-attention layers gate their output (attn_output_gate) and rotate only
    # rope["partial_rotary_factor"] of each head; every RMSNorm but the DeltaNet's output norm
    # scales by (1 + weight) (zero-centred weights, centered_norm).
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    attn_output_gate: bool = False
    centered_norm: bool = False
    mtp_num_hidden_layers: int = 0
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"unknown model_type {self.model_type!r}; qwenkit supports {', '.join(MODEL_TYPES)}")
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.layer_types and len(self.layer_types) != self.num_hidden_layers and set(self.layer_types) == {"full_attention"}:
            object.__setattr__(self, "layer_types", ("full_attention",) * self.num_hidden_layers)  # replace(num_hidden_layers=)
        if self.layer_types and len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(f"layer_types lists {len(self.layer_types)} layers; num_hidden_layers is {self.num_hidden_layers}")
        if self.is_hybrid and (self.linear_num_key_heads <= 0 or self.linear_num_value_heads % self.linear_num_key_heads):
            raise ConfigError(f"linear_num_value_heads ({self.linear_num_value_heads}) is not a multiple of "
                              f"linear_num_key_heads ({self.linear_num_key_heads})")
        if self.rope.get("rope_type") not in ROPE_TYPES:
            raise ConfigError(f"unsupported rope type {self.rope.get('rope_type')!r}; supported: {', '.join(ROPE_TYPES)}")

    # ---- derived --------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_sparse_layer(self, layer_idx: int) -> bool:
        """The qwen2_moe/qwen3_moe rule for which decoder layers hold experts."""
        return (
            self.is_moe
            and layer_idx not in self.mlp_only_layers
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )

    @property
    def context_length(self) -> int:
        """Longest sequence the rope settings are meant for (YaRN/dynamic stretch the trained one)."""
        kind, factor = self.rope["rope_type"], self.rope.get("factor") or 1.0
        if kind == "yarn":
            return max(self.max_position_embeddings, int(factor * self.rope["original_max_position_embeddings"]))
        if kind == "dynamic":
            return int(factor * self.max_position_embeddings)
        return self.max_position_embeddings

    @property
    def is_hybrid(self) -> bool:
        return "linear_attention" in self.layer_types

    def is_linear_layer(self, layer_idx: int) -> bool:
        """A Gated DeltaNet layer (recurrent state) rather than attention (KV cache)."""
        return self.layer_types[layer_idx] == "linear_attention" if self.layer_types else False

    @property
    def attention_layers(self) -> tuple[int, ...]:
        """The layers that keep K/V (all of them, except a hybrid's DeltaNet layers)."""
        return tuple(i for i in range(self.num_hidden_layers) if not self.is_linear_layer(i))

    @property
    def rotary_dim(self) -> int:
        """How many of each head's dimensions rope rotates (the rest pass through)."""
        return int(self.head_dim * self.rope.get("partial_rotary_factor", 1.0))

    def window_of(self, layer_idx: int) -> int | None:
        if self.layer_types and self.layer_types[layer_idx] == "sliding_attention":
            return self.sliding_window
        return None

    def replace(self, **changes) -> "QwenConfig":
        return dataclasses.replace(self, **changes)

    # ---- reading ---------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QwenConfig":
        d = _text_part(dict(d))
        for alias, name in _ALIASES.items():
            if alias in d and name not in d:
                d[name] = d[alias]
        model_type = d.get("model_type")
        if model_type is None:
            raise ConfigError("config has no model_type")
        if model_type not in MODEL_TYPES:
            raise ConfigError(f"unknown model_type {model_type!r}; qwenkit supports {', '.join(MODEL_TYPES)}")
        d = {**_MODEL_DEFAULTS.get(model_type, {}), **{k: v for k, v in d.items() if v is not None}}
        kw = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
        kw.pop("rope", None)
        kw["rope"] = normalise_rope(d)
        kw["qkv_bias"], kw["o_bias"] = _attention_biases(model_type, d)
        kw["qk_norm"] = model_type.startswith("qwen3")
        kw.update(_sliding_fields(d))
        kw["mlp_only_layers"] = tuple(d.get("mlp_only_layers") or ())
        kw.update(_hybrid_fields(model_type, d))
        eos = d.get("eos_token_id")
        kw["eos_token_id"] = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(**kw)

    @classmethod
    def from_file(cls, path: str | Path) -> "QwenConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{path}: bad field value ({e})") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json that transformers reads back into the same model."""
        ours = ("rope", "qkv_bias", "o_bias", "qk_norm", "attn_output_gate", "centered_norm")
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in ours}
        d["architectures"] = [_ARCH_NAMES[self.model_type]]
        d["layer_types"] = list(self.layer_types) or None
        d["mlp_only_layers"] = list(self.mlp_only_layers)
        d["eos_token_id"] = list(self.eos_token_id) if len(self.eos_token_id) != 1 else self.eos_token_id[0]
        d["rope_theta"] = self.rope["rope_theta"]
        scaling = {k: v for k, v in self.rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
        if "partial_rotary_factor" in self.rope:
            d["partial_rotary_factor"] = self.rope["partial_rotary_factor"]
        d["rope_scaling"] = scaling if scaling.get("rope_type", "default") != "default" else None
        if self.model_type == "qwen2_moe":
            d["qkv_bias"] = self.qkv_bias
        if self.model_type.startswith("qwen3"):
            d["attention_bias"] = self.qkv_bias
        if self.sliding_window is not None:
            d["use_sliding_window"] = True
        return d


# Names transformers writes for the same field.
_ALIASES = {"num_local_experts": "num_experts"}

_LINEAR_DEFAULTS = {"linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
                    "linear_num_key_heads": 16, "linear_num_value_heads": 32}

# transformers' defaults for fields a config.json may leave out, where they differ from ours.
_MODEL_DEFAULTS = {
    "qwen3": {"head_dim": 128},
    "qwen2_moe": {"num_experts": 60, "num_experts_per_tok": 4, "moe_intermediate_size": 1408,
                  "shared_expert_intermediate_size": 5632},
    "qwen3_moe": {"head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768},
    # The hybrids' transformers defaults (configuration_qwen3_next.py, configuration_qwen3_5*.py).
    "qwen3_next": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 48,
                   "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256,
                   **_LINEAR_DEFAULTS, "num_experts": 512, "num_experts_per_tok": 10,
                   "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512, "norm_topk_prob": True},
    "qwen3_5_text": {"vocab_size": 248320, "hidden_size": 4096, "intermediate_size": 12288,
                     "num_hidden_layers": 32, "num_attention_heads": 16, "num_key_value_heads": 4,
                     "head_dim": 256, **_LINEAR_DEFAULTS},
    "qwen3_5_moe_text": {"vocab_size": 248320, "hidden_size": 2048, "num_hidden_layers": 40,
                         "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256,
                         **_LINEAR_DEFAULTS, "num_experts": 256, "num_experts_per_tok": 8,
                         "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512},
}

_ARCH_NAMES = {
    "qwen2": "Qwen2ForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen3_next": "Qwen3NextForCausalLM",
    "qwen3_5_text": "Qwen3_5ForCausalLM",
    "qwen3_5_moe_text": "Qwen3_5MoeForCausalLM",
}


def _text_part(d: dict) -> dict:
    """The language model's fields of a multimodal config.json (`text_config`, with the outer
    fields it lacks, such as tie_word_embeddings), or the config itself."""
    if "text_config" not in d or "hidden_size" in d:
        return d
    outer = {k: v for k, v in d.items() if k not in ("text_config", "vision_config", "model_type")}
    text = {**outer, **d["text_config"]}
    kind = d.get("model_type")
    text["model_type"] = TEXT_PART.get(kind, kind) if kind else text.get("model_type")
    return text


def _hybrid_fields(model_type: str, d: dict) -> dict:
    """The hybrid lines' fixed choices, as their transformers classes build them."""
    if model_type not in HYBRID_TYPES:
        return {}
    fields = {"attn_output_gate": True, "centered_norm": True,
              "mtp_num_hidden_layers": int(d.get("mtp_num_hidden_layers") or 0)}
    if model_type == "qwen3_5_text":  # dense: no expert fields at all
        fields.update(num_experts=0, num_experts_per_tok=0, moe_intermediate_size=0, shared_expert_intermediate_size=0)
    if model_type == "qwen3_5_moe_text":  # every layer sparse, routing weights always renormalised
        fields.update(norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=())
    return fields


def _attention_biases(model_type: str, d: dict) -> tuple[bool, bool]:
    """(q/k/v bias, o_proj bias) as each line's transformers class builds them."""
    if model_type == "qwen2":
        return True, False
    if model_type == "qwen2_moe":
        return bool(d.get("qkv_bias", True)), False
    bias = bool(d.get("attention_bias", False))
    return bias, bias


def _sliding_fields(d: dict) -> dict:
    """Per-layer attention kinds: explicit `layer_types`, else Qwen2's max_window_layers rule."""
    window = d.get("sliding_window") if d.get("use_sliding_window") else None
    n = d.get("num_hidden_layers", 0)
    types = d.get("layer_types")
    if types is None and d.get("model_type") in HYBRID_TYPES:
        every = d.get("full_attention_interval", 4)
        types = ["full_attention" if (i + 1) % every == 0 else "linear_attention" for i in range(n)]
    if types is None:
        first = d.get("max_window_layers", 28)
        types = ["sliding_attention" if window is not None and i >= first else "full_attention" for i in range(n)]
    return {"sliding_window": window, "layer_types": tuple(types)}


def normalise_rope(d: dict) -> dict:
    """One rope dict from every spelling released checkpoints use.

    Accepted: `rope_parameters` (transformers >= 5), `rope_scaling` with `type` or `rope_type`
    (older), and `rope_theta` at the top level. YaRN's `original_max_position_embeddings`
    defaults to the model's `max_position_embeddings`, as in transformers.
    """
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    rope = {**scaling, **params} if isinstance(params, dict) else dict(scaling)
    kind = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
    rope.pop("type", None)
    if kind == "mrope":  # Qwen2-VL's multimodal rope is plain rope for text
        kind = "default"
    rope["rope_type"] = kind
    theta = rope.get("rope_theta") or d.get("rope_theta") or 10000.0
    rope["rope_theta"] = float(theta)
    partial = rope.get("partial_rotary_factor") or d.get("partial_rotary_factor")
    if partial is None and d.get("model_type") in HYBRID_TYPES:
        partial = 0.25  # the hybrids' transformers default
    if partial is not None and float(partial) != 1.0:
        rope["partial_rotary_factor"] = float(partial)
    for key in ("mrope_section", "mrope_interleaved"):  # text positions: every section equal, plain rope
        rope.pop(key, None)
    if kind in ("linear", "dynamic", "yarn") and rope.get("factor") is None and kind != "yarn":
        raise ConfigError(f"rope type {kind!r} needs a 'factor'")
    if kind == "yarn":
        original = d.get("original_max_position_embeddings") or d.get("max_position_embeddings", 32768)
        rope.setdefault("original_max_position_embeddings", original)
    return rope
