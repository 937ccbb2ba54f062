"""Building blocks: RMSNorm, the SwiGLU MLP (gate and up fused) and the mixture-of-experts block.

Parameters are created empty; weights always come from a checkpoint or an explicit init
(`QwenForCausalLM.init_weights`). Expert weights are stored stacked, one tensor per projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..backends import cpu_kernels

ACTIVATIONS = {"silu": F.silu, "gelu": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}
GEMV_ROWS = (2, 8)  # fp32 rows for which qwenkit's CPU GEMV beats torch's GEMM (measured on AVX2)
# More rows (prefill, large batches) go to oneDNN's fp32 GEMM where torch has it: on this AMD CPU,
# one core, it multiplies 17-128 rows 1.35-1.65x faster than F.linear's MKL path, 512 rows 1.03-1.13x.
ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class Linear(nn.Linear):
    """nn.Linear whose inference on 2-8 rows of fp32 on an AVX2 CPU runs qwenkit's GEMV
    (`cpu_kernels.c`): torch's GEMM is at the bandwidth bound for one row but 2-3x slower per call
    for a handful (batched decode), while the GEMV reads the weights once for all rows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.numel() else 0
        if (rows >= GEMV_ROWS[0] and x.dtype == torch.float32 and x.device.type == "cpu"
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
                and self.weight.dtype == torch.float32
                and self.weight.is_contiguous()):
            if rows <= GEMV_ROWS[1]:
                if cpu_kernels.kernels() is not None:
                    return cpu_kernels.f32_gemv(x.reshape(rows, -1), self.weight, self.bias).reshape(*x.shape[:-1], -1)
            else:
                return fp32_linear(x, self.weight, self.bias)
        return super().forward(x)


def fp32_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T (+ bias) for fp32 inference on the CPU (many rows): oneDNN's GEMM where torch has it."""
    if ONEDNN and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and not torch.is_grad_enabled():
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu_kernels.fp32_inference(x, self.weight):
            return cpu_kernels.rms_norm(x, self.weight, self.eps)
        # Normalise in float32 and multiply after casting back, as the reference does (bf16 parity).
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)); gate and up are one matmul (rows [0:I] gate, [I:2I] up)."""

    def __init__(self, hidden: int, intermediate: int, act: str = "silu"):
        super().__init__()
        self.intermediate = intermediate
        self.gate_up_proj = Linear(hidden, 2 * intermediate, bias=False)
        self.down_proj = Linear(intermediate, hidden, bias=False)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # (..., 2I)
        if self.act is F.silu and cpu_kernels.fp32_inference(gate_up):
            return self.down_proj(cpu_kernels.silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)  # (..., I) each
        return self.down_proj(self.act(gate) * up)


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
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)  # (N, E)
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
