"""The C kernels built for AVX512-VNNI (each int8 dot product of 4 one `vpdpbusd`) give the AVX2
build's results bit for bit: the int8 GEMV (the only code the flag changes) over row counts,
widths with partial blocks, and weights at the int8 extremes."""

from __future__ import annotations

import shutil

import pytest
import torch

from qwenkit.backends import cpu_kernels
from qwenkit.backends.host import cpu_features

pytestmark = [
    pytest.mark.skipif(cpu_kernels.kernels() is None, reason=f"{cpu_kernels.why_unavailable()}"),
    pytest.mark.skipif("AVX512-VNNI" not in cpu_features(),
                       reason="this CPU lacks AVX512-VNNI: only the AVX2 build runs here"),
]


def _gemv(lib, x, w, s, bias):
    M, K = x.shape
    y = torch.empty(M, w.shape[0])
    assert lib.qk_int8_gemv_f32(x.data_ptr(), w.data_ptr(), s.data_ptr(), bias.data_ptr(), y.data_ptr(),
                                M, w.shape[0], K, 2) == 0
    return y


def test_vnni_int8_gemv_equals_the_avx2_build_bit_for_bit():
    compiler = shutil.which("cc") or shutil.which("gcc")
    avx2, vnni = (cpu_kernels.load(cpu_kernels._build(compiler, cpu_kernels.build_flags(v))) for v in (False, True))
    gen = torch.Generator().manual_seed(0)
    for M in (1, 2, 3, 5, 8, 16):
        for K in (32, 96, 200, 896):
            N = 37
            x = torch.randn(M, K, generator=gen) * 10 ** torch.empty(M, 1).uniform_(-3, 3, generator=gen)
            w = torch.randint(-127, 128, (N, K), generator=gen, dtype=torch.int8)
            w[0], w[1] = 127, -127  # the extremes: pair sums at their largest
            s, bias = torch.rand(N, generator=gen) / 64, torch.randn(N, generator=gen)
            a, b = _gemv(avx2, x, w, s, bias), _gemv(vnni, x, w, s, bias)
            assert torch.equal(a, b), (M, K)
            ref = (x @ (w.float() * s[:, None]).T) + bias
            torch.testing.assert_close(a, ref, rtol=0.05, atol=0.05 * ref.abs().max().item())  # the kernel at all
