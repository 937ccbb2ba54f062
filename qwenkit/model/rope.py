"""Rotary position embeddings: default, linear, dynamic NTK and YaRN, chosen from a plain dict.

Each init function maps (rope dict, head_dim, max_position_embeddings, seq_len) to
(inv_freq, attention_factor). `seq_len` matters only for dynamic NTK, which rescales the base
once the sequence outgrows the trained context; computing it per call from the largest position
gives exactly what transformers' stateful update gives during generation.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))  # (dim/2,)


def default_inv_freq(rope: dict, dim: int, max_pos: int, seq_len: int):
    return _base_inv_freq(rope["rope_theta"], dim), 1.0


def linear_inv_freq(rope: dict, dim: int, max_pos: int, seq_len: int):
    return _base_inv_freq(rope["rope_theta"], dim) / rope["factor"], 1.0


def dynamic_inv_freq(rope: dict, dim: int, max_pos: int, seq_len: int):
    factor = rope["factor"]
    seq_len = max(seq_len, max_pos)
    # float32 on purpose: the reference computes this base from a tensor.
    scale = torch.tensor(factor * seq_len / max_pos - (factor - 1), dtype=torch.float32)
    base = rope["rope_theta"] * scale ** (dim / (dim - 2))
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)), 1.0


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_inv_freq(rope: dict, dim: int, max_pos: int, seq_len: int):
    theta = rope["rope_theta"]
    original = rope["original_max_position_embeddings"]
    factor = rope.get("factor") or max_pos / original
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all = rope.get("mscale"), rope.get("mscale_all_dim")
        if mscale and mscale_all:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast = rope.get("beta_fast") or 32
    beta_slow = rope.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:  # the dimension that turns `rotations` times over `original`
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolate = 1 - ramp  # 1 where the dimension keeps its trained frequency
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq, float(attention_factor)


ROPE_INIT = {
    "default": default_inv_freq,
    "linear": linear_inv_freq,
    "dynamic": dynamic_inv_freq,
    "yarn": yarn_inv_freq,
}


class Rope:
    """Computes cos/sin tables for given positions. Holds no parameters or buffers."""

    def __init__(self, rope: dict, head_dim: int, max_position_embeddings: int):
        self.rope = rope
        self.kind = rope["rope_type"]
        self.dim = head_dim
        self.max_pos = max_position_embeddings
        self._static = None  # computed on first use: the model may be built on the meta device

    def inv_freq(self, seq_len: int) -> tuple[torch.Tensor, float]:
        if self.kind == "dynamic":
            return ROPE_INIT[self.kind](self.rope, self.dim, self.max_pos, seq_len)
        if self._static is None:
            with torch.device("cpu"):
                self._static = ROPE_INIT[self.kind](self.rope, self.dim, self.max_pos, 0)
        return self._static

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) int -> cos, sin (B, T, 1, D) in `dtype` (computed in float32)."""
        seq_len = int(positions.max()) + 1 if self.kind == "dynamic" else 0
        with torch.device("cpu"):
            inv_freq, scale = self.inv_freq(seq_len)
        freqs = positions.float()[..., None] * inv_freq.to(positions.device)  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
        cos, sin = emb.cos() * scale, emb.sin() * scale
        return cos.to(dtype)[:, :, None, :], sin.to(dtype)[:, :, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, n, D) rotated by the half-split convention Qwen checkpoints use. With cos/sin
    narrower than D (partial rotary: the hybrid models), the first R dimensions rotate and the
    rest pass through."""
    rot = cos.shape[-1]
    if rot < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :rot], cos, sin), x[..., rot:]), dim=-1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Rotary(nn.Module):
    """`apply_rope` as a module (no parameters), so that a backend can swap in a one-pass kernel."""

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return apply_rope(x, cos, sin)
