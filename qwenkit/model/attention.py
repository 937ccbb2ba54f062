"""Grouped-query attention: one forward for training, generation and cached decoding.

Q, K and V come from one fused projection. GQA never repeats K/V: PyTorch's SDPA takes
n_kv < n_heads directly (`enable_gqa`), and its CPU flash kernel reads each KV head once. With a
cache, the cache stores the new K/V and hands its storage to the attention op (`model/cache.py`);
without one, the op attends over the call's own tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import RMSNorm
from .rope import Rotary


class SDPA(nn.Module):
    """The attention op: softmax(q k^T / sqrt(D) + mask) v over dense K/V, or over a paged pool.

    A module (no parameters) so that a backend can install another implementation; one instance
    may serve every layer.
    """

    def forward(self, q, k, v, mask) -> torch.Tensor:
        """q (B, H, T, D); k, v (B, n_kv, S, D); mask None (causal) or bool (B|1, 1, T, S)."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)

    def paged(self, q, k_pool, v_pool, slots, mask) -> torch.Tensor:
        """q (B, H, T, D) over a pool (slots, n_kv, D) read through `slots` (a `SlotMap` with
        read_slots): plain torch gathers each row's slots; backends read them in place."""
        k = k_pool[slots.read_slots].transpose(1, 2)  # (B, n_kv, S, D)
        v = v_pool[slots.read_slots].transpose(1, 2)
        return self(q, k, v, mask)


class Attention(nn.Module):
    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.split = (q_size, kv_size, kv_size)
        self.qkv_proj = nn.Linear(cfg.hidden_size, q_size + 2 * kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.rotary = Rotary()
        self.sdpa = SDPA()

    def forward(self, x, cos, sin, mask, cache=None) -> torch.Tensor:
        """x (B, T, H); cos/sin (B, T, 1, D); mask: None (plain causal) or bool (B, 1, T, S)."""
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim)  # (B, T, nh, D)
        k = k.view(B, T, self.n_kv, self.head_dim)  # (B, T, n_kv, D)
        v = v.view(B, T, self.n_kv, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(q, cos, sin), self.rotary(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)
        if cache is None:
            out = self.sdpa(q, k, v, mask)
        else:
            out = cache.attend(self.layer_idx, q, k, v, mask, self.sdpa)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))  # (B, T, H)
