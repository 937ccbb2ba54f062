"""The Qwen decoder (Qwen1.5/2/2.5, Qwen3, both MoE lines, and the hybrid Qwen3-Next / Qwen3.5)
in one module, chosen by config flags.

qkv_bias (Qwen2.x), qk_norm (Qwen3), sparse MoE layers with or without a shared expert
(qwen2_moe / qwen3_moe / qwen3_next / qwen3_5_moe_text), tied or untied embeddings. The hybrids
are a layer kind: layers whose `layer_types` entry is "linear_attention" mix tokens with a Gated
DeltaNet (`deltanet.py`) instead of attention; their attention gates its output and rotates part
of each head (`attn_output_gate`, partial rotary) and their norms are zero-centred (`centered_norm`). Parameter names follow the Hugging Face
layout except for the fused projections (qkv_proj, gate_up_proj); `weight_map.py` maps
checkpoint names onto them.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import QwenConfig
from .attention import Attention
from .cache import HybridCache, KVCache
from .deltanet import GatedDeltaNet
from .layers import CenteredRMSNorm, GatedMLP, SparseMoE, make_norm
from .masks import layer_masks, positions_of
from .rope import Rope


class DecoderLayer(nn.Module):
    def __init__(self, cfg: QwenConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = make_norm(cfg, cfg.hidden_size)
        self.is_linear = cfg.is_linear_layer(layer_idx)
        if self.is_linear:
            self.linear_attn = GatedDeltaNet(cfg, layer_idx)
        else:
            self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = make_norm(cfg, cfg.hidden_size)
        if cfg.is_sparse_layer(layer_idx):
            self.mlp = SparseMoE(cfg)
        else:
            self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x, cos, sin, mask, cache=None):
        """mask: the attention mask, or for a recurrent layer the real-token mask (`model/masks.py`)."""
        h = self.input_layernorm(x)
        x = x + (self.linear_attn(h, mask, cache) if self.is_linear else self.self_attn(h, cos, sin, mask, cache))
        return x + self.mlp(self.post_attention_layernorm(x))


class QwenBackbone(nn.Module):
    def __init__(self, cfg: QwenConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = make_norm(cfg, cfg.hidden_size)


class QwenForCausalLM(nn.Module):
    """`model(input_ids, attention_mask=None)` -> float logits (B, T, vocab).

    With a 1/0 `attention_mask` (left padding), positions count only real tokens, so each row's
    logits equal those of the sequence run alone. Pass a cache (`model/cache.py`: `new_cache`, or
    an engine's paged cache) to decode incrementally. A forward is `begin` (embeddings, positions,
    masks), `run_layers` and `finish` (norm, LM head); a backend's decode step reuses the first
    and last and runs the layers its own way.
    """

    def __init__(self, cfg: QwenConfig):
        super().__init__()
        self.config = cfg
        self.model = QwenBackbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rope = Rope(cfg.rope, cfg.rotary_dim, cfg.max_position_embeddings)
        self.eos_token_ids: list[int] = list(cfg.eos_token_id)
        self.windows = [cfg.window_of(i) for i in range(cfg.num_hidden_layers)]
        self.linear = [cfg.is_linear_layer(i) for i in range(cfg.num_hidden_layers)]
        self.mtp_weights: dict[str, torch.Tensor] = {}  # a checkpoint's multi-token-prediction head, as stored
        self.source: str | None = None  # the checkpoint loaded (`load_model` sets both)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype  # the embedding's may be quantized

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    def new_cache(self, batch: int, max_len: int) -> KVCache | HybridCache:
        kind = HybridCache if self.config.is_hybrid else KVCache
        return kind(self.config, batch, max_len, self.dtype, self.device)

    def forward(self, input_ids, attention_mask=None, *, cache=None, logits_to_keep: int = 0,
                return_hidden: bool = False):
        """input_ids (B, T); attention_mask (B, S) over cached + new tokens; returns (B, T or keep, V),
        or with return_hidden (logits, the final norm's output (B, T, H) at every position): what
        an MTP head reads."""
        x, cos, sin, masks = self.begin(input_ids, attention_mask, cache)
        x = self.run_layers(x, cos, sin, masks, cache)
        return self.finish(x, cache, input_ids.shape[1], logits_to_keep, return_hidden)

    def begin(self, input_ids, attention_mask=None, cache=None):
        """(x (B, T, H), cos, sin (B|1, T, 1, D), one mask per layer) for a call's tokens."""
        T = input_ids.shape[1]
        if cache is None:
            positions = positions_of(attention_mask, 0, T, input_ids.device)  # (B|1, T)
            masks = layer_masks(attention_mask, 0, T, self.windows, self.linear, input_ids.device)
        else:
            positions, masks = cache.begin(attention_mask, T)
        x = self.model.embed_tokens(input_ids)  # (B, T, H)
        cos, sin = self.rope.cos_sin(positions, x.dtype)
        return x, cos, sin, masks

    def run_layers(self, x, cos, sin, masks, cache=None) -> torch.Tensor:
        for layer, mask in zip(self.model.layers, masks):
            x = layer(x, cos, sin, mask, cache)
        return x

    def finish(self, x, cache, T: int, logits_to_keep: int = 0, return_hidden: bool = False):
        """Logits (B, T or keep, V) in float32 from the last hidden states (and with return_hidden
        the normed states (B, T, H) too); closes the cache's call."""
        if cache is not None:
            cache.end(T)
        if return_hidden:
            h = self.model.norm(x)  # (B, T, H)
            return self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h).float(), h
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return self.lm_head(self.model.norm(x)).float()  # (B, T, V)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, seed: int | None = None) -> "QwenForCausalLM":
        """Random init for training from scratch: normal linears/embeddings, unit norms (zero for
        zero-centred ones), the DeltaNet decays as the reference draws them."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        for m in self.modules():
            if isinstance(m, CenteredRMSNorm):
                m.weight.zero_()
            elif isinstance(m, GatedDeltaNet):
                m.init_gates(gen)
        return self
