"""Dtype and device names -> torch objects: the one resolver for every command and the Python API.

Names: "auto" (see `auto_dtype`), bf16/bfloat16, fp32/float32, fp16/float16. Device "auto" is
cuda when a CUDA device is available, else cpu. `load_model` resolves "auto" itself, with the
checkpoint in hand (`backends.auto_plan`: weights kept quantized or in bf16 under fp32
arithmetic on a CPU); `auto_dtype` is the plain form, for what has no checkpoint to decide by
(training, tensor-parallel shards, a peer's dtype in the bench).
"""

from __future__ import annotations

import torch

from .errors import ConfigError

DTYPE_NAMES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32",
               "fp16": "float16", "float16": "float16"}


def auto_dtype(device="cpu") -> torch.dtype:
    """bf16 where the hardware multiplies it natively (CUDA, CPUs with AVX512-BF16 or AMX), else fp32.

    Without native support torch's CPU bf16 matmul falls back to a generic kernel that is about
    100x slower than fp32 (measured: 0.85 vs 78 GFLOP/s on an AVX2-only EPYC).
    """
    from .backends.host import native_bf16

    if torch.device(device).type != "cpu":
        return torch.bfloat16
    return torch.bfloat16 if native_bf16() else torch.float32


def resolve_dtype(dtype: str | torch.dtype, device="cpu") -> torch.dtype:
    """A torch.dtype as given, or the one a name stands for ("auto" picks for `device`)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return auto_dtype(device)
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype {dtype!r} is not auto or one of {', '.join(DTYPE_NAMES)}")
    return getattr(torch, DTYPE_NAMES[dtype])


def resolve_device(device: str = "auto") -> str:
    """For "auto" cuda when a CUDA device is available, else cpu; any other name as given, once checked
    (here, so a typo or a missing GPU is a one-line ConfigError rather than torch's traceback)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {device!r} is not auto or a torch device (cpu, cuda, cuda:1, ...)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: no CUDA device is available")
    return device
