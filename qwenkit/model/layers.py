"""Building blocks: RMSNorm (plain and zero-centred), the SwiGLU MLP (gate and up fused) and the
mixture-of-experts block.

Parameters are created empty; weights always come from a checkpoint or an explicit init
(`QwenForCausalLM.init_weights`). Expert weights are stored stacked, one tensor per projection.
Plain torch only: faster forms of these modules are installed from outside (`qwenkit.backends`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"silu": F.silu, "gelu": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and multiply after casting back, as the reference does (bf16 parity).
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class CenteredRMSNorm(nn.Module):
    """RMSNorm whose weight is stored zero-centred, x_hat * (1 + w), in float32 throughout (the
    hybrid models' norms; their reference rounds once, at the end)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acc = torch.promote_types(x.dtype, torch.float32)  # float32 at least (float64 stays)
        h = x.to(acc)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.to(acc))).to(x.dtype)


def make_norm(cfg, dim: int) -> nn.Module:
    """The model's RMSNorm over `dim` features: zero-centred where the config says so."""
    return (CenteredRMSNorm if cfg.centered_norm else RMSNorm)(dim, cfg.rms_norm_eps)


class GatedActivation(nn.Module):
    """act(gate) * up for gate_up (..., 2I) holding [gate | up] -> (..., I). A module of its own
    so that a backend can swap in a one-pass kernel."""

    def __init__(self, act: str = "silu"):
        super().__init__()
        self.name = act
        self.act = ACTIVATIONS[act]

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)  # (..., I) each
        return self.act(gate) * up


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)); gate and up are one matmul (rows [0:I] gate, [I:2I] up)."""

    def __init__(self, hidden: int, intermediate: int, act: str = "silu"):
        super().__init__()
        self.intermediate = intermediate
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act_fn = GatedActivation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))  # (..., 2I) -> (..., I) -> (..., H)


class Experts(nn.Module):
    """E gated MLPs stored stacked: gate_up_proj (E, 2I, H), down_proj (E, H, I)."""

    def __init__(self, n_experts: int, hidden: int, intermediate: int, act: str = "silu"):
        super().__init__()
        self.intermediate = intermediate
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden, intermediate))
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor, top_idx: torch.Tensor, top_w: torch.Tensor) -> torch.Tensor:
        """x (N, H); top_idx, top_w (N, k) -> (N, H), each token the weighted sum of its experts."""
        out = torch.zeros_like(x)
        flat = top_idx.flatten()  # (N*k,)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.gate_up_proj.shape[0]).tolist()
        tokens = order // top_idx.shape[1]
        weights = top_w.flatten()[order]
        start = 0
        for expert, n in enumerate(counts):
            if n == 0:
                continue
            idx = tokens[start : start + n]
            gate, up = F.linear(x[idx], self.gate_up_proj[expert]).chunk(2, dim=-1)  # (n, I)
            y = F.linear(self.act(gate) * up, self.down_proj[expert])  # (n, H)
            out.index_add_(0, idx, y * weights[start : start + n, None])
            start += n
        return out


class SparseMoE(nn.Module):
    """Softmax top-k router over experts, plus (qwen2_moe) a shared expert behind a sigmoid gate."""

    def __init__(self, cfg):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.hidden_act)
        self.shared_expert = None
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = GatedMLP(cfg.hidden_size, cfg.shared_expert_intermediate_size, cfg.hidden_act)
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.promote_types(x.dtype, torch.float32))  # (N, E)
        top_w, top_idx = torch.topk(probs, self.top_k, dim=-1)  # (N, k)
        if self.norm_topk_prob:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        return top_idx, top_w.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, H)
        top_idx, top_w = self.route(x)
        out = self.experts(x, top_idx, top_w)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.reshape(shape)
