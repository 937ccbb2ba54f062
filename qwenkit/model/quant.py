"""Weight-only quantization applied from outside the model: int8 per channel, int4 per group.

`quantize(model, "int8")` swaps every projection (qkv, o, gate_up, down, experts excluded) and
the LM head for a module that keeps packed weights and calls torch's weight-only kernels
(`_weight_int8pack_mm`, `_weight_int4pack_mm[_for_cpu]`). Decode at batch 1 is bound by reading
weights, so halving (int8) or quartering (int4) the bytes read is what makes it faster. On an AVX2
CPU, fp32 int8 calls of up to 16 rows (decode) go to qwenkit's own GEMV (`cpu_kernels.c`), which
streams the int8 weights once; longer inputs (prefill) dequantize W once and use the fp32 GEMM.
"""

from __future__ import annotations

import torch
from torch import nn

from . import cpu_kernels

SCHEMES = ("int8", "int4")


class Int8Linear(nn.Module):
    """y = x W^T (+ b) with W stored as int8 (N, K) and one scale per output channel."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()  # (N, K)
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # (N,)
        self.register_buffer("weight", torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(linear.weight.dtype))
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def dequantized(self) -> torch.Tensor:
        """W as fp32 (N, K)."""
        if self.weight.device.type == "cpu" and cpu_kernels.kernels() is not None:
            return cpu_kernels.int8_dequant(self.weight, self.scales.float())
        return self.weight.float() * self.scales.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (M, K)
        if x.device.type == "cpu" and x.dtype == torch.float32 and not x.requires_grad:
            if x2.shape[0] <= cpu_kernels.MAX_ROWS and cpu_kernels.kernels() is not None:
                bias = None if self.bias is None else self.bias.detach().float().contiguous()
                return cpu_kernels.int8_gemv(x2, self.weight, self.scales.float(), bias).reshape(*shape[:-1], -1)
            if x2.shape[0] > cpu_kernels.MAX_ROWS:  # prefill: one dequantized copy of W, then fp32 GEMM
                y = x2 @ self.dequantized().T
                y = y.reshape(*shape[:-1], self.out_features)
                return y if self.bias is None else y + self.bias
        y = torch._weight_int8pack_mm(x2, self.weight, self.scales)  # (M, N)
        y = y.reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class Int4Linear(nn.Module):
    """y = x W^T (+ b) with W in 4 bits: groups of `group_size` inputs share a scale and a minimum.

    An fp32 model on the CPU with groups of 32 keeps qwenkit's own layout (`cpu_kernels.pack_int4`)
    for its AVX2 GEMV; anything else keeps the layout of torch's int4 kernels."""

    def __init__(self, linear: nn.Linear, group_size: int = 32):
        super().__init__()
        N, K = linear.weight.shape
        if K % group_size:
            raise ValueError(f"in_features {K} is not a multiple of the int4 group size {group_size}")
        w = linear.weight.detach().float().reshape(N, K // group_size, group_size)
        lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        scale = ((hi - lo) / 15).clamp(min=1e-8)  # (N, K/G, 1)
        q = torch.round((w - lo) / scale).clamp(0, 15).to(torch.int32).reshape(N, K)
        self.device_kind = linear.weight.device.type
        self.own_layout = self.device_kind == "cpu" and linear.weight.dtype == torch.float32 and group_size == 32
        if self.own_layout:
            self.register_buffer("qweight", cpu_kernels.pack_int4(q))  # (N, K/2) uint8
            self.register_buffer("scales", scale[..., 0].contiguous())  # (N, K/32) fp32
            self.register_buffer("mins", lo[..., 0].contiguous())  # (N, K/32) fp32
        else:
            zero = lo + 8 * scale  # torch's kernels compute (q - 8) * scale + zero
            scale_zero = torch.cat([scale, zero], -1).transpose(0, 1).contiguous()  # (K/G, N, 2)
            self.register_buffer("packed", _pack_int4(q, linear.weight.device))
            self.register_buffer("scale_zero", scale_zero.to(linear.weight.dtype))
        self.group_size = group_size
        self.bias = linear.bias
        self.in_features, self.out_features = K, N

    def dequantized(self) -> torch.Tensor:
        """W as fp32 (N, K) (qwenkit's layout only)."""
        if cpu_kernels.kernels() is not None:
            return cpu_kernels.int4_dequant(self.qweight, self.scales, self.mins)
        q = cpu_kernels.unpack_int4(self.qweight).float().reshape(self.out_features, -1, self.group_size)
        return (q * self.scales[..., None] + self.mins[..., None]).reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.own_layout:
            if (x.dtype == torch.float32 and not x.requires_grad and x2.shape[0] <= cpu_kernels.MAX_ROWS
                    and cpu_kernels.kernels() is not None):
                bias = None if self.bias is None else self.bias.detach().float().contiguous()
                y = cpu_kernels.int4_gemv(x2, self.qweight, self.scales, self.mins, bias)
                return y.reshape(*shape[:-1], -1).to(x.dtype)
            y = x2 @ self.dequantized().to(x.dtype).T  # prefill: one dequantized copy of W, then the GEMM
        elif self.device_kind == "cpu":
            y = torch._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scale_zero)
        else:
            y = torch._weight_int4pack_mm(x2, self.packed, self.group_size, self.scale_zero)
        y = y.reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def _pack_int4(q: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return torch._convert_weight_to_int4pack_for_cpu(q, 1)
    uint8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)  # CUDA kernel layout: two values per byte
    return torch._convert_weight_to_int4pack(uint8.to(device), 8)


@torch.no_grad()
def quantize(model, scheme: str = "int8", group_size: int = 32):
    """Replace the model's dense projections and LM head in place; returns the model."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization {scheme!r}; choose from {', '.join(SCHEMES)}")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.out_features > 1:  # not the shared-expert gate
                new = Int8Linear(child) if scheme == "int8" else Int4Linear(child, group_size)
                setattr(parent, name, new)
    model.quantization = scheme
    return model
