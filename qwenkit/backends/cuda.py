"""The CUDA backend's module form: the attention op that reads the engine's paged pool in place.

`swap_attention(model)` gives every layer a `PagedKernelSDPA` that knows its layer's sliding
window; its one-query `paged` call runs the Triton kernel of `paged_attention.py` on the pool's
blocks (no gather of the context), anything else goes through the plain op. Installed only on a
CUDA model with Triton present (`backends.install`, backend "cuda-graphs"); the decode steps
over static buffers live in `graphed_step.py`.
"""

from __future__ import annotations

from ..model.attention import SDPA
from .paged_attention import HAS_TRITON, kernel_fits, paged_decode


class PagedKernelSDPA(SDPA):
    def __init__(self, window: int | None = None):
        super().__init__()
        self.window = window

    def paged(self, q, k_pool, v_pool, slots, mask):
        if not kernel_fits(q, slots.block_size):
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
