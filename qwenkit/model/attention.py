"""Grouped-query attention (one forward for training, generation and cached decoding) and its KV cache.

Q, K and V come from one fused projection. GQA never repeats K/V: PyTorch's SDPA takes
n_kv < n_heads directly (`enable_gqa`), and its CPU flash kernel reads each KV head once. Decode
(one new token) on the CPU in fp32 runs `cpu_kernels.attend_one` instead, 2-5x faster than SDPA there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..backends import cpu_kernels
from .layers import Linear, RMSNorm
from .rope import apply_rope


class KVCache:
    """A preallocated cache for a batch: k and v of shape (layers, B, n_kv, max_len, D).

    `length` counts the slots written so far; the model advances it after each forward.
    """

    def __init__(self, cfg, batch: int, max_len: int, dtype: torch.dtype, device="cpu"):
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_kv, T, D) after the cached slots; return all slots so far (B, n_kv, S, D)."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; {end} needed")
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.length += n


class Attention(nn.Module):
    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.split = (q_size, kv_size, kv_size)
        self.qkv_proj = Linear(cfg.hidden_size, q_size + 2 * kv_size, bias=cfg.qkv_bias)
        self.o_proj = Linear(q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None) -> torch.Tensor:
        """x (B, T, H); cos/sin (B, T, 1, D); mask: None (plain causal) or bool (B, 1, T, S)."""
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim)  # (B, T, nh, D)
        k = k.view(B, T, self.n_kv, self.head_dim)  # (B, T, n_kv, D)
        v = v.view(B, T, self.n_kv, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)
        out = None
        if cache is not None and T == 1 and hasattr(cache, "attend_one"):  # a paged pool, read in place
            out = cache.attend_one(self.layer_idx, q, k, v, mask)
        if out is None and cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, n_kv, S, D)
        if out is None and T == 1:
            out = cpu_kernels.attend_one(q, k, v, mask)
        if out is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))  # (B, T, H)
