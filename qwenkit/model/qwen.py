"""The Qwen decoder (Qwen1.5/2/2.5, Qwen3, and both MoE lines) in one module, chosen by config flags.

qkv_bias (Qwen2.x), qk_norm (Qwen3), sparse MoE layers with or without a shared expert
(qwen2_moe / qwen3_moe), tied or untied embeddings. Parameter names follow the Hugging Face
layout except for the fused projections (qkv_proj, gate_up_proj); `weight_map.py` maps
checkpoint names onto them.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import QwenConfig
from ..backends import fused_decode
from .attention import Attention, KVCache
from .layers import GatedMLP, Linear, RMSNorm, SparseMoE
from .rope import Rope


class DecoderLayer(nn.Module):
    def __init__(self, cfg: QwenConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.is_sparse_layer(layer_idx):
            self.mlp = SparseMoE(cfg)
        else:
            self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x, cos, sin, mask, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class QwenBackbone(nn.Module):
    def __init__(self, cfg: QwenConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class QwenForCausalLM(nn.Module):
    """`model(input_ids, attention_mask=None)` -> float logits (B, T, vocab).

    With a 1/0 `attention_mask` (left padding), positions count only real tokens, so each row's
    logits equal those of the sequence run alone. Pass a `KVCache` to decode incrementally; an fp32
    model on the CPU then runs each one-token step's layers in one C call (`fused_decode.py`).
    """

    def __init__(self, cfg: QwenConfig):
        super().__init__()
        self.config = cfg
        self.model = QwenBackbone(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rope = Rope(cfg.rope, cfg.head_dim, cfg.max_position_embeddings)
        self.eos_token_ids: list[int] = list(cfg.eos_token_id)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype  # the embedding's may be quantized

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(self.config, batch, max_len, self.dtype, self.device)

    def forward(self, input_ids, attention_mask=None, *, cache=None, positions=None, mask=None,
                logits_to_keep: int = 0) -> torch.Tensor:
        """input_ids (B, T); attention_mask (B, S) over cached + new tokens; returns (B, T or keep, V).

        `cache` is anything with `update(layer, k, v) -> (k_all, v_all)`, `advance(n)` and `length`
        (the KVCache here, or an engine's paged cache). An engine that batches sequences of different
        lengths passes `positions` (B, T) and a bool `mask` (B, 1, T, S) itself.
        """
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if positions is None:
            positions = _positions(attention_mask, past, T, input_ids.device)  # (B, T)
        if mask is None:
            mask = _attention_mask(attention_mask, past, T, self.config, input_ids.device)
        x = self.model.embed_tokens(input_ids)  # (B, T, H)
        cos, sin = self.rope.cos_sin(positions, x.dtype)
        if not (T == 1 and fused_decode.decode_layers(self, x, cos, sin, mask, cache, positions)):
            for layer in self.model.layers:
                lm = mask[layer.self_attn.layer_idx] if isinstance(mask, list) else mask
                x = layer(x, cos, sin, lm, cache)
        if cache is not None:
            cache.advance(T)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return self.lm_head(self.model.norm(x)).float()  # (B, T, V)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, seed: int | None = None) -> "QwenForCausalLM":
        """Random init for training from scratch: normal linears/embeddings, unit norms."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        return self


def _positions(attention_mask, past: int, T: int, device) -> torch.Tensor:
    if attention_mask is None:
        return torch.arange(past, past + T, device=device)[None]  # (1, T)
    pos = attention_mask.long().cumsum(-1) - 1  # (B, S): pads before the first token get -1
    return pos[:, -T:].clamp(min=0)


def _attention_mask(attention_mask, past: int, T: int, cfg: QwenConfig, device):
    """None when plain causal attention suffices; else a bool (B|1, 1, T, S) mask, or one per layer.

    A query always sees itself, so rows of left padding stay finite instead of NaN.
    """
    windows = {cfg.window_of(i) for i in range(cfg.num_hidden_layers)}
    padded = attention_mask is not None and not bool(attention_mask.all())
    if past == 0 and not padded and windows == {None}:
        return None
    S = past + T
    q_slot = torch.arange(past, S, device=device)[:, None]  # (T, 1)
    k_slot = torch.arange(S, device=device)[None, :]  # (1, S)
    causal = k_slot <= q_slot  # (T, S)
    base = causal[None, None]  # (1, 1, T, S)
    if padded:
        valid = attention_mask[:, None, None, :S].bool()  # (B, 1, 1, S)
        base = (base & valid) | (k_slot == q_slot)
    if windows == {None}:
        return base
    masks = {w: base if w is None else base & (q_slot - k_slot < w) for w in windows}
    return [masks[cfg.window_of(i)] for i in range(cfg.num_hidden_layers)]
