"""Gated DeltaNet: the linear-attention layer of the hybrid Qwen models (Qwen3-Next, Qwen3.5).

One projection gives, per token, q, k, v (through a causal depthwise convolution of width K and
SiLU), an output gate z and the per-head scalars b and a. Each value head keeps a state matrix
S (d_k, d_v) that the gated delta rule updates token by token:

    S <- exp(g) S;   S <- S + k (beta (v - S^T k))^T;   o = S^T q

with q and k L2-normalised (q also scaled by 1/sqrt(d_k)), beta = sigmoid(b) and
g = -exp(A_log) softplus(a + dt_bias) <= 0. The output goes through an RMSNorm gated by SiLU(z)
and out_proj. Two forms compute the rule, equal up to rounding: `delta_rule_recurrent` (one token
at a time: decode) and `delta_rule_chunked` (blocks of 64 tokens solved in parallel: prefill).
A row's past is two tensors, the convolution's last K-1 inputs and S, which the cache keeps
(`read_state` / `write_state`, `model/cache.py`); S is float32 whatever the model's dtype.
When the cache says it may be asked to take back up to w of the call's tokens (`trim_window`:
speculative decoding), the call runs its last w + 1 tokens in the recurrent form, token by token
as decoding would, and hands the cache both states after each of them, from which `trim` restores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CHUNK = 64


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def delta_rule_recurrent(q, k, v, g, beta, state, trail: list | None = None):
    """q, k (B, h, T, dk), v (B, h, T, dv), g, beta (B, h, T), state (B, h, dk, dv), all float32
    -> (outputs (B, h, T, dv), state after the last token). Three passes over S a token: decay,
    one matmul reading S for k and q together (o = S'^T q = e^g S^T q + (q.k) delta), the update.
    `trail`, when given, gets the state after each token appended (T tensors, none shared)."""
    outs = []
    for t in range(q.shape[2]):
        state = state * g[:, :, t, None, None].exp()  # a new tensor: the caller's state is kept
        k_t, q_t = k[:, :, t, None, :], q[:, :, t, None, :]  # (B, h, 1, dk)
        read = torch.cat([k_t, q_t], dim=2) @ state  # (B, h, 2, dv): S^T k, S^T q
        delta = (v[:, :, t, None, :] - read[:, :, :1]) * beta[:, :, t, None, None]  # (B, h, 1, dv)
        outs.append(read[:, :, 1:] + (q_t * k_t).sum(-1, keepdim=True) * delta)
        state.addcmul_(k_t.transpose(-1, -2), delta)  # rank-1 update (B, h, dk, dv)
        if trail is not None:
            trail.append(state)
    return torch.cat(outs, dim=2), state


def delta_rule_trail(q, k, v, g, beta, state, n: int):
    """The rule over T tokens keeping the state after each of the last n: chunked up to them, then
    token by token as decoding runs -> (outputs (B, h, T, dv), states (B, n, h, dk, dv))."""
    head = q.shape[2] - n
    outs, trail = [], []
    if head:
        out, state = delta_rule_chunked(q[:, :, :head], k[:, :, :head], v[:, :, :head], g[:, :, :head],
                                        beta[:, :, :head], state)
        outs.append(out)
    outs.append(delta_rule_recurrent(q[:, :, head:], k[:, :, head:], v[:, :, head:], g[:, :, head:],
                                     beta[:, :, head:], state, trail)[0])
    return torch.cat(outs, dim=2), torch.stack(trail, dim=1)


def delta_rule_chunked(q, k, v, g, beta, state, chunk: int = CHUNK):
    """The same rule, `chunk` tokens at a time. Within a chunk with log-decays G_i = g_1 + .. + g_i,
    the corrections u_i = beta_i (v_i - S_{i-1}^T k_i) solve a unit lower-triangular system
    (I + A) U = beta V - beta e^G K S0, A_ij = beta_i e^(G_i - G_j) k_i.k_j (j < i); then
    o_i = e^G_i S0^T q_i + sum_{j<=i} e^(G_i - G_j) (q_i.k_j) u_j and S = e^G_C S0 + sum_j e^(G_C - G_j) k_j u_j^T."""
    B, h, T, dk = k.shape
    pad = (-T) % chunk  # zero tokens (k = 0, beta = 0, g = 0) leave the state as it is
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (F.pad(x, (0, pad)) for x in (g, beta))
    n = (T + pad) // chunk
    q, k, v = (x.reshape(B, h, n, chunk, -1) for x in (q, k, v))  # (B, h, n, C, d)
    g, beta = g.reshape(B, h, n, chunk), beta.reshape(B, h, n, chunk)
    G = g.cumsum(-1)  # (B, h, n, C)
    decay = _segment_sums(g).exp()  # (.., C, C): e^(G_i - G_j) for j <= i, else 0
    k_beta = k * beta[..., None]
    system = (k_beta @ k.transpose(-1, -2)) * decay  # its strict lower triangle is A
    solve = lambda rhs: torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)  # noqa: E731
    w = solve(v * beta[..., None])  # (.., C, dv): U = w - kd S0
    kd = solve(k_beta * G.exp()[..., None])  # (.., C, dk)
    scores = (q @ k.transpose(-1, -2)) * decay  # (.., C, C)
    q_decayed = q * G.exp()[..., None]
    to_end = F.pad(g.flip(-1).cumsum(-1).flip(-1)[..., 1:], (0, 1))  # G_C - G_j, summed, not subtracted
    k_to_end = k * to_end.exp()[..., None]
    chunk_decay = G[..., -1].exp()[..., None, None]  # (B, h, n, 1, 1)
    out = torch.empty_like(v)
    for i in range(n):
        u = w[:, :, i] - kd[:, :, i] @ state  # (B, h, C, dv)
        out[:, :, i] = q_decayed[:, :, i] @ state + scores[:, :, i] @ u
        state = state * chunk_decay[:, :, i] + k_to_end[:, :, i].transpose(-1, -2) @ u
    return out.reshape(B, h, n * chunk, -1)[:, :, :T], state


def _segment_sums(g: torch.Tensor) -> torch.Tensor:
    """(.., C) -> (.., C, C): g_{j+1} + .. + g_i at [i, j] for j <= i, -inf above. Summed term by
    term: G_i - G_j from the running sums loses the digits of the difference once G is large
    (strong decays over a chunk), which a chunked prefill then disagrees with a whole one by."""
    C = g.shape[-1]
    lower = torch.ones(C, C, dtype=torch.bool, device=g.device).tril()
    terms = g[..., :, None].expand(*g.shape, C).masked_fill(~lower.tril(-1), 0.0)  # [m, j] = g_m for m > j
    return terms.cumsum(-2).masked_fill(~lower, float("-inf"))


def causal_conv(x: torch.Tensor, past: torch.Tensor, weight: torch.Tensor):
    """Depthwise causal convolution + SiLU of x (B, C, T) after `past` (B, C, K-1), the inputs
    before it; weight (C, 1, K) -> (output (B, C, T), the last K-1 inputs). K shifted
    multiply-adds: oneDNN's depthwise convolution took 34 ms for one decode token of 12,288
    channels, this takes well under one."""
    full = torch.cat([past.to(x.dtype), x], dim=-1)  # (B, C, K-1+T)
    K, T = weight.shape[-1], x.shape[-1]
    acc = torch.promote_types(x.dtype, torch.float32)  # sums in float32, rounded once, as a convolution does
    taps, w = full.to(acc), weight[:, 0].to(acc)  # w (C, K)
    out = taps[..., :T] * w[:, 0, None]
    for j in range(1, K):
        out = out + taps[..., j : j + T] * w[:, j, None]  # (B, C, T)
    return F.silu(out.to(x.dtype)), full[..., full.shape[-1] - past.shape[-1]:].clone()  # not a view of `full`


def conv_tails(past: torch.Tensor, x: torch.Tensor, n: int) -> torch.Tensor:
    """The convolution's last K-1 inputs after each of the last n tokens of x (B, C, T) that
    followed `past` (B, C, K-1): after t tokens they are the last K-1 of [past | x[..., :t]].
    -> (B, n, C, K-1), the last entry the tail after all of x."""
    full = torch.cat([past.to(x.dtype), x], dim=-1)  # (B, C, K-1+T)
    K1, T = past.shape[-1], x.shape[-1]
    return full.unfold(-1, K1, 1)[:, :, T + 1 - n:].transpose(1, 2).clone()  # (B, n, C, K-1)


class GatedRMSNorm(nn.Module):
    """RMSNorm of each head's output times SiLU(gate), the gate in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        acc = torch.promote_types(x.dtype, torch.float32)
        h = x.to(acc)
        h = self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return (h * F.silu(gate.to(acc))).to(x.dtype)


class GatedDeltaNet(nn.Module):
    """The token mixer of a hybrid model's linear-attention layer. in_proj is one matmul whose rows
    are [q | k | v | z | b | a] (checkpoints split or interleave them; `weight_map.py` maps each)."""

    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.nk, self.nv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        self.dk, self.dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        key_dim, value_dim = self.nk * self.dk, self.nv * self.dv
        self.conv_dim = 2 * key_dim + value_dim
        self.split = (self.conv_dim, value_dim, self.nv, self.nv)  # [q | k | v], z, b, a
        self.in_proj = nn.Linear(cfg.hidden_size, sum(self.split), bias=False)
        K = cfg.linear_conv_kernel_dim
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, K, groups=self.conv_dim, bias=False, padding=K - 1)
        self.dt_bias = nn.Parameter(torch.empty(self.nv))
        self.A_log = nn.Parameter(torch.empty(self.nv))
        self.norm = GatedRMSNorm(self.dv, cfg.rms_norm_eps)
        self.out_proj = nn.Linear(value_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None, cache=None) -> torch.Tensor:
        """x (B, T, H); valid (B, T) bool or None (all real): padding enters as zeros, which
        leave both states at zero, so a left-padded row equals the row alone."""
        B, T, _ = x.shape
        if valid is not None:
            x = x * valid[..., None].to(x.dtype)
        qkv, z, b, a = self.in_proj(x).split(self.split, dim=-1)
        if cache is None:
            past, state = qkv.new_zeros(B, self.conv_dim, self.conv1d.kernel_size[0] - 1), None
        else:
            past, state = cache.read_state(self.layer_idx)
        window = 0 if cache is None else cache.trim_window()
        tails = conv_tails(past, qkv.transpose(1, 2), window + 1) if window else None
        qkv, past = causal_conv(qkv.transpose(1, 2), past, self.conv1d.weight)  # (B, C, T)
        q, k, v = qkv.transpose(1, 2).split((self.nk * self.dk, self.nk * self.dk, self.nv * self.dv), dim=-1)
        acc = torch.promote_types(x.dtype, torch.float32)  # the rule runs in float32 at least
        q, k = (self._per_value_head(t).to(acc) for t in (q, k))  # (B, nv, T, dk)
        q, k = l2_normalize(q) * self.dk**-0.5, l2_normalize(k)
        v = v.reshape(B, T, self.nv, self.dv).transpose(1, 2).to(acc)  # (B, nv, T, dv)
        beta = b.sigmoid().to(acc).transpose(1, 2)  # (B, nv, T)
        g = (-self.A_log.to(acc).exp() * F.softplus(a.to(acc) + self.dt_bias)).transpose(1, 2)
        if state is None:
            state = q.new_zeros(B, self.nv, self.dk, self.dv)
        if window:  # the cache may be asked to take back tokens: the state after each of the last ones
            out, states = delta_rule_trail(q, k, v, g, beta, state, window + 1)  # (B, nv, T, dv)
            cache.write_state(self.layer_idx, tails, states)
        else:
            rule = delta_rule_recurrent if T == 1 else delta_rule_chunked
            out, state = rule(q, k, v, g, beta, state)  # (B, nv, T, dv)
            if cache is not None:
                cache.write_state(self.layer_idx, past, state)
        out = self.norm(out.transpose(1, 2).to(x.dtype), z.reshape(B, T, self.nv, self.dv))
        return self.out_proj(out.reshape(B, T, -1))  # (B, T, H)

    def _per_value_head(self, t: torch.Tensor) -> torch.Tensor:
        """(B, T, nk * dk) -> (B, nv, T, dk): each key head serves nv / nk value heads in turn."""
        B, T, _ = t.shape
        t = t.reshape(B, T, self.nk, self.dk).repeat_interleave(self.nv // self.nk, dim=2)
        return t.transpose(1, 2)

    @torch.no_grad()
    def init_gates(self, gen: torch.Generator | None = None) -> None:
        """The reference's init for the decay parameters: dt_bias 1, A in [1, 16]."""
        self.dt_bias.fill_(1.0)
        self.A_log.copy_(torch.empty(self.nv).uniform_(1.0, 16.0, generator=gen).log())
