"""The CPU-kernel backend: the model's modules swapped for forms that call qwenkit's C kernels.

Installed on an fp32 model on a CPU with the kernels built (`backends.choose`); a bf16 model
gets only the attention op (`attention_form`). Each swapped
module keeps its parameters (same names, same tensors); only `forward` changes. The kernels take
fp32 inference only, so each forward steps back to the plain module's math under autograd (a
loaded model being fine-tuned) or for inputs the kernel does not take.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model.attention import SDPA
from ..model.layers import GatedActivation, RMSNorm
from ..model.rope import Rotary
from . import cpu_kernels

GEMV_ROWS = (2, 8)  # fp32 rows for which qwenkit's CPU GEMV beats torch's GEMM (measured on AVX2)
# More rows (prefill, large batches) go to oneDNN's fp32 GEMM where torch has it: on an AMD CPU,
# one core, it multiplies 17-128 rows 1.35-1.65x faster than F.linear's MKL path, 512 rows 1.03-1.13x.
ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def fp32_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T (+ bias) for fp32 inference on the CPU (many rows): oneDNN's GEMM where torch has it."""
    if ONEDNN and x.dtype == weight.dtype == torch.float32 and not torch.is_grad_enabled():
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def _inference(x: torch.Tensor) -> bool:
    return x.dtype == torch.float32 and not (torch.is_grad_enabled() and x.requires_grad)


class CpuLinear(nn.Linear):
    """2-8 fp32 rows through qwenkit's GEMV (torch's GEMM is at the bandwidth bound for one row
    but 2-3x slower per call for a handful, while the GEMV reads the weights once for all rows);
    more rows through oneDNN's GEMM."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.numel() else 0
        if rows < GEMV_ROWS[0] or not _inference(x) or self.weight.requires_grad and torch.is_grad_enabled():
            return super().forward(x)
        if rows <= GEMV_ROWS[1]:
            return cpu_kernels.f32_gemv(x.reshape(rows, -1), self.weight, self.bias).reshape(*x.shape[:-1], -1)
        return fp32_linear(x, self.weight, self.bias)


class CpuRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.dtype != torch.float32:
            return super().forward(x)
        return cpu_kernels.rms_norm(x, self.weight, self.eps)


class CpuSiluMul(GatedActivation):
    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or gate_up.dtype != torch.float32:
            return super().forward(gate_up)
        return cpu_kernels.silu_mul(gate_up)


class CpuRotary(Rotary):
    def forward(self, x, cos, sin):
        out = None if torch.is_grad_enabled() or x.dtype != torch.float32 else cpu_kernels.rope(x, cos, sin)
        return super().forward(x, cos, sin) if out is None else out  # one pass instead of six torch ops


class CpuSDPA(SDPA):
    """One-query attention (decode) through `qk_attend_one`, 2-5x faster than SDPA on a CPU, read
    in place from a static cache's slices or a paged pool, fp32 or bf16; anything else through SDPA."""

    def forward(self, q, k, v, mask):
        out = cpu_kernels.attend_one(q, k, v, mask) if q.shape[2] == 1 else None
        return super().forward(q, k, v, mask) if out is None else out

    def paged(self, q, k_pool, v_pool, slots, mask):
        out = None
        if q.shape[2] == 1 and mask is not None:
            layout = kernel_layout(slots)
            out = None if layout is None else cpu_kernels.attend_paged(q, k_pool, v_pool, layout, mask)
        return super().paged(q, k_pool, v_pool, slots, mask) if out is None else out


def kernel_layout(slots) -> cpu_kernels.Layout | None:
    """The C layout of a SlotMap; a paged one's is made (and its tables checked) once per call and
    shared by the layers. None when a position has no block or a block lies outside the pool."""
    if slots.tables is None:
        return cpu_kernels.Layout(slots.sb, slots.sh, slots.ss, None, 0, 1)
    if "cpu" not in slots.derived:
        pool = slots.k[0]  # (slots, Hkv, D)
        slots.derived["cpu"] = cpu_kernels.paged_layout(slots.tables, slots.block_size, pool, slots.read_len)
    return slots.derived["cpu"]


SWAPS = {nn.Linear: CpuLinear, RMSNorm: CpuRMSNorm, Rotary: CpuRotary, SDPA: CpuSDPA}


def attention_form(module: nn.Module) -> type | None:
    """The attention op alone: for bf16 models, whose matmuls stay torch's (oneDNN bf16)."""
    return CpuSDPA if type(module) is SDPA else None


def cpu_form(module: nn.Module) -> type | None:
    """The CPU-kernel class for a model module, or None (SiLU gates only: the kernel fuses SiLU)."""
    if type(module) is GatedActivation:
        return CpuSiluMul if module.name == "silu" else None
    return SWAPS.get(type(module))
