"""The CPU kernels of a decode step besides the GEMVs: attention (`cpu_kernels.attend_one`) against
torch's SDPA, RMSNorm, RoPE and SwiGLU against their torch definitions, and the model's decode
through them against the model's decode through torch's ops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import qwenkit
from qwenkit.model import cpu_kernels
from tiny import make_checkpoint

pytestmark = pytest.mark.skipif(cpu_kernels.kernels() is None, reason=f"{cpu_kernels.why_unavailable()}")


def _cache(B, Hkv, S, D, layout, gen):
    """k or v (B, Hkv, S, D) laid out as a static cache slice or a paged cache's gathered rows."""
    if layout == "static":  # (B, Hkv, max_len, D) sliced to S
        return torch.randn(B, Hkv, S + 37, D, generator=gen)[:, :, :S]
    if layout == "paged":  # (B, S, Hkv, D) transposed
        return torch.randn(B, S, Hkv, D, generator=gen).transpose(1, 2)
    return torch.randn(B, Hkv, S, D, generator=gen)


@pytest.mark.parametrize("B,H,Hkv,D", [(1, 14, 2, 64), (3, 4, 4, 128), (2, 8, 1, 24)])
@pytest.mark.parametrize("S", [1, 7, 64, 65, 300])
@pytest.mark.parametrize("layout", ["contiguous", "static", "paged"])
def test_decode_attention_equals_sdpa(B, H, Hkv, D, S, layout):
    gen = torch.Generator().manual_seed(S * 7 + D)
    q = torch.randn(B, H, 1, D, generator=gen) * 2
    k, v = _cache(B, Hkv, S, D, layout, gen), _cache(B, Hkv, S, D, layout, gen)
    mask = torch.rand(B, 1, 1, S, generator=gen) > 0.3
    mask[..., 0] = True  # every row sees something (SDPA gives NaN otherwise)
    with torch.no_grad():
        for m in (None, mask, mask[:1]):  # mask[:1]: one row of the mask for every row
            ref = F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)
            out = cpu_kernels.attend_one(q, k, v, m)
            assert out.shape == ref.shape
            torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)


def test_decode_attention_row_that_sees_nothing_is_zero_and_others_unaffected():
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 1, 64, generator=gen), torch.randn(2, 2, 9, 64, generator=gen), torch.randn(2, 2, 9, 64, generator=gen)
    mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    mask[1] = False
    with torch.no_grad():
        out = cpu_kernels.attend_one(q, k, v, mask)
        ref = F.scaled_dot_product_attention(q[:1], k[:1], v[:1], enable_gqa=True)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(out[:1], ref, atol=2e-6, rtol=1e-5)


def test_decode_attention_declines_what_it_does_not_take():
    q, k = torch.randn(1, 4, 1, 64), torch.randn(1, 2, 5, 64)
    with torch.no_grad():
        assert cpu_kernels.attend_one(q.bfloat16(), k.bfloat16(), k.bfloat16(), None) is None  # not fp32
        assert cpu_kernels.attend_one(q, k, k.clone().transpose(2, 3).contiguous().transpose(2, 3), None) is None
        assert cpu_kernels.attend_one(q, k, k, torch.ones(1, 1, 2, 5, dtype=torch.bool)) is None  # not one query
    assert cpu_kernels.attend_one(q.requires_grad_(), k, k, None) is None  # autograd: SDPA's backward


@pytest.mark.parametrize("shape", [(1, 1, 896), (3, 5, 24), (2, 7)])
def test_rms_norm_and_swiglu_equal_torch(shape):
    from qwenkit.model.layers import RMSNorm

    gen = torch.Generator().manual_seed(len(shape))
    x = torch.randn(shape, generator=gen) * 3
    norm = RMSNorm(shape[-1], 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], generator=gen))
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        torch.testing.assert_close(cpu_kernels.rms_norm(x, norm.weight, 1e-6), norm.weight * h, atol=1e-6, rtol=1e-5)
        gate_up = torch.cat([x * 10, x], dim=-1)  # gates far into both tails of the sigmoid
        gate, up = gate_up.chunk(2, dim=-1)
        torch.testing.assert_close(cpu_kernels.silu_mul(gate_up), F.silu(gate) * up, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("B,cos_rows", [(1, 1), (3, 1), (3, 3)])
def test_rope_equals_the_torch_rotation(B, cos_rows):
    from qwenkit.model import rope

    gen = torch.Generator().manual_seed(B)
    T, n, D = 5, 3, 24
    qkv = torch.randn(B, T, n * D + 40, generator=gen)
    x = qkv[..., : n * D].view(B, T, n, D)  # a view of a wider row, as q and k are of qkv
    cos, sin = torch.randn(2, cos_rows, T, 1, D, generator=gen)
    half = D // 2
    expected = x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
    with torch.no_grad():
        torch.testing.assert_close(cpu_kernels.rope(x, cos, sin), expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(rope.apply_rope(x, cos, sin), expected, atol=1e-6, rtol=1e-5)
        assert cpu_kernels.rope(x.transpose(1, 2), cos, sin) is None  # heads not laid out in rows


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_model_decode_through_the_kernels_equals_decode_through_torch(tmp_path, arch, monkeypatch):
    """Logits of 20 cached decode steps (batch 2, left padding: a mask) with and without the kernels."""
    model = qwenkit.load_model(make_checkpoint(tmp_path / "ckpt", arch), dtype=torch.float32)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    attention_mask = torch.ones(2, 32, dtype=torch.long)
    attention_mask[1, :4] = 0
    calls = []
    kernel = cpu_kernels.attend_one

    def counted(*args):
        calls.append(1)
        return kernel(*args)

    def decode(attend):
        monkeypatch.setattr(cpu_kernels, "attend_one", attend)
        cache, x, out = model.new_cache(2, 32), ids, []
        with torch.no_grad():
            for t in range(20):
                logits = model(x, attention_mask[:, : 12 + t], cache=cache)[:, -1]
                out.append(logits)
                x = logits.argmax(-1, keepdim=True)
        return torch.stack(out)

    fast = decode(counted)
    assert len(calls) == 19 * model.config.num_hidden_layers  # every step after the prefill
    monkeypatch.setattr(cpu_kernels, "kernels", lambda: None)  # no C kernel anywhere: torch's ops
    slow = decode(lambda *args: None)
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)
