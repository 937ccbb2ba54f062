"""The Triton kernel behind `paged_attention.paged_decode` (imported only when it first runs).

One program per (row, K/V head): the G query heads sharing that K/V head are scored against
the row's keys one block (BS slots) at a time, read where the block table says they live, under
an online softmax in float32 (running max `m`, denominator `den`, weighted sum `acc`), so the
context is never gathered. Keys [lo, length) are read: lo > 0 only under a sliding window.
"""

import triton
import triton.language as tl


@triton.jit
def paged_decode_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, lengths_ptr, out_ptr, stride_qb, stride_qh,
                        stride_ks, stride_kh, stride_tb, scale, window,
                        G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                        BS: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)  # the K/V head; its G query heads are h*G .. h*G+G-1
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    s = tl.arange(0, BS)
    qmask = (g < G)[:, None] & (d < D)[None, :]
    q_off = b * stride_qb + (h * G + g)[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_off, mask=qmask, other=0.0).to(tl.float32)  # (G_PAD, D_PAD)
    length = tl.load(lengths_ptr + b)
    lo = tl.where(window > 0, tl.maximum(length - window, 0), 0)  # the first key the query sees
    m = tl.full((G_PAD,), float("-inf"), tl.float32)
    den = tl.zeros((G_PAD,), tl.float32)
    acc = tl.zeros((G_PAD, D_PAD), tl.float32)
    for blk in range(lo // BS, tl.cdiv(length, BS)):
        block = tl.load(tables_ptr + b * stride_tb + blk)
        j = blk * BS + s
        valid = (j < length) & (j >= lo)
        kv_off = (block * BS + s)[:, None] * stride_ks + h * stride_kh + d[None, :]
        kvmask = valid[:, None] & (d < D)[None, :]
        k = tl.load(k_ptr + kv_off, mask=kvmask, other=0.0).to(tl.float32)  # (BS, D_PAD)
        v = tl.load(v_ptr + kv_off, mask=kvmask, other=0.0).to(tl.float32)
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # (G_PAD, BS)
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m - m_new)
        den = den * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new
    out = acc / den[:, None]
    tl.store(out_ptr + q_off, out.to(out_ptr.dtype.element_ty), mask=qmask)
