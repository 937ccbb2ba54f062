"""Grouped-query attention: one forward for training, generation and cached decoding.

Q, K and V come from one fused projection; in the hybrid models' gated attention the Q part
holds, per head, the query and an output gate (out * sigmoid(gate) before o_proj). GQA never repeats K/V: PyTorch's SDPA takes
n_kv < n_heads directly (`enable_gqa`), and its CPU flash kernel reads each KV head once. With a
cache, the cache stores the new K/V and hands its storage to the attention op (`model/cache.py`);
without one, the op attends over the call's own tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import make_norm
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
        self.gated = cfg.attn_output_gate
        self.split = ((2 if self.gated else 1) * q_size, kv_size, kv_size)
        self.qkv_proj = nn.Linear(cfg.hidden_size, sum(self.split), bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.q_norm = make_norm(cfg, self.head_dim) if cfg.qk_norm else None
        self.k_norm = make_norm(cfg, self.head_dim) if cfg.qk_norm else None
        self.rotary = Rotary()
        self.sdpa = SDPA()

    def forward(self, x, cos, sin, mask, cache=None) -> torch.Tensor:
        """x (B, T, H); cos/sin (B, T, 1, D); mask: None (plain causal) or bool (B, 1, T, S)."""
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        gate = None
        if self.gated:  # per head [query | gate]
            q, gate = q.view(B, T, self.n_heads, 2 * self.head_dim).chunk(2, dim=-1)  # (B, T, nh, D) each
        q = q.reshape(B, T, self.n_heads, self.head_dim)  # (B, T, nh, D)
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
        out = out.transpose(1, 2).reshape(B, T, -1)  # (B, T, nh * D)
        if gate is not None:
            out = out * torch.sigmoid(gate.reshape(B, T, -1))
        return self.o_proj(out)  # (B, T, H)
