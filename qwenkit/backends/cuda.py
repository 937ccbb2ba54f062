"""The CUDA backend's module forms: paged attention read in place, quantized prefill at bf16 speed.

- `swap_attention(model)` gives every layer a `PagedKernelSDPA` that knows its layer's sliding
  window; its one-query `paged` call runs the Triton kernel of `paged_attention.py` on the pool's
  blocks (no gather of the context), anything else goes through the plain op. Installed on a
  CUDA model with Triton present.
- `quant_form`: int8 / int4 layers keep torch's packed kernels for decode (few rows: they read
  1/2 or 1/4 of bf16's bytes) and multiply prefill's many rows by a dequantized copy of W made
  once, on first use, with the dense GEMM: dequantizing per call made int8/int4 prefill 15-30x
  slower than bf16 on an H200. The copy costs a bf16 model's memory beside the packed weights.

Both are installed by `backends.install` (backend "cuda-graphs"); the decode steps over static
buffers live in `graphed_step.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model.attention import SDPA
from .paged_attention import HAS_TRITON, kernel_fits, paged_decode
from .quant import Int4Linear, Int8Linear

PACKED_ROWS = 16  # up to this many rows a call reads the packed weights; more use the dense copy


class PagedKernelSDPA(SDPA):
    def __init__(self, window: int | None = None):
        super().__init__()
        self.window = window

    def paged(self, q, k_pool, v_pool, slots, mask):
        if not kernel_fits(q):
            return super().paged(q, k_pool, v_pool, slots, mask)
        lengths = slots.write_at + 1  # (B,) the query is the row's last position
        return paged_decode(q, k_pool, v_pool, slots.tables, lengths, slots.block_size, self.window)


def kernel_available(model) -> bool:
    """Whether the in-place paged kernel can run for this model (on CUDA, with Triton)."""
    return model.device.type == "cuda" and HAS_TRITON


def swap_attention(model) -> None:
    """Give each layer the in-place paged attention op, with its layer's window."""
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.sdpa = PagedKernelSDPA(model.config.window_of(i))


def _dense_for_prefill(module, x: torch.Tensor, packed) -> torch.Tensor:
    """`packed(x)` for up to PACKED_ROWS rows; more rows multiply a dense copy of W, made once."""
    if x.numel() // x.shape[-1] <= PACKED_ROWS:
        return packed(x)
    w = module.__dict__.get("_dense")
    if w is None or w.dtype != x.dtype:
        w = module.__dict__["_dense"] = module.dense_weight(x.dtype)  # (N, K), not a buffer: never saved
    return F.linear(x, w, module.bias)


class DenseInt8Linear(Int8Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _dense_for_prefill(self, x, super().forward)

    def dense_weight(self, dtype) -> torch.Tensor:
        return self.dequantized(dtype)


class DenseInt4Linear(Int4Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _dense_for_prefill(self, x, super().forward)

    def dense_weight(self, dtype, chunk: int = 2048) -> torch.Tensor:
        """W (N, K) as torch's int4 kernel sees it: the kernel times the identity, a chunk of rows
        at a time (exact: each output is one weight times 1)."""
        K, dev = self.in_features, self.packed.device
        mm = torch._weight_int4pack_mm_for_cpu if self.device_kind == "cpu" else torch._weight_int4pack_mm
        parts = []
        for k0 in range(0, K, chunk):
            eye = torch.zeros(min(chunk, K - k0), K, dtype=self.scale_zero.dtype, device=dev)
            eye[:, k0:k0 + eye.shape[0]] = torch.eye(eye.shape[0], dtype=eye.dtype, device=dev)
            parts.append(mm(eye, self.packed, self.group_size, self.scale_zero))  # (chunk, N) = W^T rows
        return torch.cat(parts).t().contiguous().to(dtype)


def quant_form(module) -> type | None:
    """The dense-prefill class for a quantized layer in torch's layouts, else None."""
    if type(module) is Int8Linear:
        return DenseInt8Linear
    if type(module) is Int4Linear and not module.own_layout:
        return DenseInt4Linear
    return None
