"""One-query (decode) attention over the engine's paged pool, reading K/V blocks in place.

`paged_decode` runs a Triton kernel (`paged_attention_kernel.py`): one program per (row, K/V
head) reads the row's keys 64 at a time through its block table, with an online softmax, so no
step gathers a row's context into a new tensor. It runs where
Triton runs (CUDA; on a CPU only under Triton's interpreter, `TRITON_INTERPRET=1`, which the
tests use). `paged_decode_torch` is the same attention in plain torch (gather the table's slots,
SDPA under the causal / window mask): the reference the kernel is tested against, and what runs
where there is no Triton.

Both take q (B, H, 1, D), pools (slots, n_kv, D), tables (B, n_blocks) int64 (entries past a
row's length may hold any valid block id), lengths (B,) int64 (keys [0, length) are the row's
context; the query sits at length - 1) and a window (None: full causal).
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from ..model.masks import slot_masks

HAS_TRITON = importlib.util.find_spec("triton") is not None  # imported on first use (~0.5 s)
TILE = 64  # keys a kernel iteration reads (several blocks of any size)


def paged_decode_torch(q, k_pool, v_pool, tables, lengths, block_size: int, window: int | None) -> torch.Tensor:
    """The reference: gather every slot the tables name, attend under the causal / window mask."""
    B, n_blocks = tables.shape
    j = torch.arange(n_blocks * block_size, device=tables.device)
    slots = tables[:, j // block_size] * block_size + j % block_size  # (B, S)
    k = k_pool[slots].transpose(1, 2)  # (B, n_kv, S, D)
    v = v_pool[slots].transpose(1, 2)
    mask = slot_masks((lengths - 1)[:, None], slots.shape[1], [window])[0]  # (B, 1, 1, S)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def kernel_fits(q: torch.Tensor) -> bool:
    """Whether `paged_decode` takes this call: Triton present and one query a row."""
    return HAS_TRITON and q.shape[2] == 1


def paged_decode(q, k_pool, v_pool, tables, lengths, block_size: int, window: int | None) -> torch.Tensor:
    """The Triton kernel: the same result as `paged_decode_torch`, reading blocks in place."""
    import triton

    from .paged_attention_kernel import paged_decode_kernel

    B, H, _, D = q.shape
    n_kv = k_pool.shape[1]
    q = q.contiguous()
    out = torch.empty_like(q)  # (B, H, 1, D)
    G = H // n_kv
    paged_decode_kernel[(B, n_kv)](
        q, k_pool, v_pool, tables, lengths, out, q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1),
        tables.stride(0), D ** -0.5, window or 0, block_size, G=G, G_PAD=max(triton.next_power_of_2(G), 16),
        D=D, D_PAD=max(triton.next_power_of_2(D), 16), TILE=TILE)
    return out
