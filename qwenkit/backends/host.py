"""What this machine has, read once: the CPU's vector and matrix extensions and a CUDA device.

Backends and `--dtype auto` decide from this; the bench prints `features()` beside its figures.
"""

from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=1)
def cpu_features() -> tuple[str, ...]:
    """The extensions that change which kernels run here, in the order they build on each other."""
    found = [("AVX2", torch.cpu._is_avx2_supported()), ("AVX-512", torch.cpu._is_avx512_supported()),
             ("AVX512-VNNI", torch.cpu._is_vnni_supported()), ("AVX512-BF16", torch.cpu._is_avx512_bf16_supported()),
             ("AMX", torch.cpu._is_amx_tile_supported())]
    return tuple(name for name, present in found if present)


def native_bf16() -> bool:
    """Whether the CPU multiplies bf16 natively (AVX512-BF16 or AMX): oneDNN's bf16 GEMM then runs
    3-4x faster than the fp32 one; without it torch's bf16 matmul is ~100x slower than fp32
    (0.85 vs 78 GFLOP/s measured on an AVX2-only EPYC)."""
    return bool({"AVX512-BF16", "AMX"} & set(cpu_features()))


def features() -> str:
    """One line for reports: the CPU's extensions, and the GPU when there is one."""
    cpu = " ".join(cpu_features()) or "no AVX2"
    gpu = f"; CUDA {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"CPU {cpu}{gpu}"
