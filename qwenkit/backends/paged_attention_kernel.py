"""The Triton kernel behind `paged_attention.paged_decode` (imported only when it first runs).

One program per (row, K/V head): the G query heads sharing that K/V head (padded to 16 rows, the
least `tl.dot` takes) are scored against the row's keys TILE at a time. Each key's slot is looked
up where the block table says it lives (a tile may span several blocks, of any block size), so
the context is never gathered; an online softmax in float32 (running max `m`, denominator `den`,
weighted sum `acc`) merges the tiles. Keys [lo, length) are read: lo > 0 only under a sliding
window. Everything is multiplied in IEEE fp32 (bf16 K/V widened as loaded; no TF32): decode
reads far more bytes than it multiplies, so tensor cores would not pay, and an fp32 model keeps
its precision.
"""

import triton
import triton.language as tl


@triton.jit
def paged_decode_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, lengths_ptr, out_ptr, stride_qb, stride_qh,
                        stride_ks, stride_kh, stride_tb, scale, window, block_size,
                        G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                        TILE: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)  # the K/V head; its G query heads are h*G .. h*G+G-1
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    t = tl.arange(0, TILE)
    qmask = (g < G)[:, None] & (d < D)[None, :]
    q_off = b * stride_qb + (h * G + g)[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_off, mask=qmask, other=0.0).to(tl.float32)  # (G_PAD, D_PAD)
    length = tl.load(lengths_ptr + b)
    lo = tl.where(window > 0, tl.maximum(length - window, 0), 0)  # the first key the query sees
    m = tl.full((G_PAD,), float("-inf"), tl.float32)
    den = tl.zeros((G_PAD,), tl.float32)
    acc = tl.zeros((G_PAD, D_PAD), tl.float32)
    for start in range((lo // TILE) * TILE, length, TILE):
        j = start + t  # (TILE,) positions
        valid = (j < length) & (j >= lo)
        block = tl.load(tables_ptr + b * stride_tb + j // block_size, mask=valid, other=0)
        kv_off = (block * block_size + j % block_size)[:, None] * stride_ks + h * stride_kh + d[None, :]
        kvmask = valid[:, None] & (d < D)[None, :]
        k = tl.load(k_ptr + kv_off, mask=kvmask, other=0.0).to(tl.float32)  # (TILE, D_PAD)
        v = tl.load(v_ptr + kv_off, mask=kvmask, other=0.0).to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision="ieee")  # (G_PAD, TILE)
        scores = tl.where(valid[None, :], scores * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m - m_new)
        den = den * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m = m_new
    out = acc / den[:, None]
    tl.store(out_ptr + q_off, out.to(out_ptr.dtype.element_ty), mask=qmask)
