"""Backends: faster forms of the model, installed on a loaded model from outside, chosen once.

The model (`qwenkit/model/`) is the math in plain torch. A backend swaps some of its modules for
forms with the same parameters and a faster `forward`, and may install a decode step (the whole
one-token call done its own way), which `generate` and the engine's runner ask for with
`decode_step(model)`. `load_model` calls `install(model)`; call it again after changing a
model's dtype or device. Which path runs where (phase: prefill = many tokens a row, decode = one):

| device, host | model (weights) | prefill | decode |
|---|---|---|---|
| CPU with AVX2 and a C compiler | fp32 | oneDNN fp32 GEMM (> 8 rows); C norm, RoPE, SiLU | fused C step: all layers in one call, fp32 GEMVs, attention read in place (static or paged) |
| same | fp32 activations, int8 / int4 / bf16 weights (`quantize=`) | weights dequantized once per call, then the GEMM | fused C step with the integer / bf16 GEMVs |
| CPU with AVX2 and a C compiler | bf16 | torch: oneDNN bf16 GEMM (AVX512-BF16, AMX) | torch modules; C attention over the bf16 cache, read in place (static or paged) |
| CUDA | any | torch: cuBLAS, SDPA | torch modules |
| anything else (no AVX2, no compiler, QWENKIT_CPU_KERNELS=0) | any | torch | torch |

Each row is a `BACKENDS` entry; `choose(model)` picks one from the model's device and dtype and
from what the host has (`cpu_kernels.kernels()` is None where the C kernels cannot run).
"bf16 GEMM" in prefill means: on CPUs that multiply bf16 natively (AVX512-BF16, AMX; see
`host.py`) the weights, as stored or dequantized to bf16 once a call, meet activations rounded
to bf16 in oneDNN's bf16 GEMM (3-4x the fp32 GEMM's rate); elsewhere the fp32 GEMM.

`--dtype auto` (`auto_plan`) picks what is loaded, from the device, the host and how the
checkpoint stores its matrices, for the fastest correct path per phase:

| device, host | checkpoint stores | loaded as | prefill | decode |
|---|---|---|---|---|
| CPU with the C kernels | 4-8 bit blocks (a quantized GGUF) | fp32 activations, int8 weights (per channel) | bf16 GEMM where native, else fp32 GEMM, on W dequantized once a call | fused C step, int8 GEMV |
| same | bf16 / fp16 | fp32 activations, bf16 weights (exact for bf16) | bf16 GEMM where native, else fp32 GEMM | fused C step, bf16 GEMV |
| same | fp32 | fp32 | fp32 GEMM | fused C step, fp32 GEMV |
| CPU without the C kernels | any | bf16 where native, else fp32 | torch | torch |
| CUDA | any | bf16 | torch | torch |

An explicit `--dtype` (and `--quantize`) loads exactly what it names. Why int8 for a quantized
GGUF, measured on the default model (Q5_0/Q4_K/Q6_K/Q8_0 mix), AVX-512 + AVX512-BF16 host, 2
threads, one run: int8 decodes batch 1 at 91.7 tok/s against int4's 93.9 and prefills at 743
tok/s against int4's 442 (its dequantization is the slower), with perplexity +0.1% of the
dequantized file against int4's +7% (int4 re-rounds the file's 5-bit blocks to 4 bits).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from . import cpu, cpu_kernels
from .cpu import attention_form, cpu_form
from .fused_decode import FusedDecode
from .host import native_bf16

BACKENDS = ("cpu-kernels", "cpu-attention", "torch")
FORMS = {"cpu-kernels": cpu_form, "cpu-attention": attention_form}
_STEPS: "weakref.WeakKeyDictionary[nn.Module, FusedDecode]" = weakref.WeakKeyDictionary()
_INSTALLED: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()


def auto_plan(device, stored: str) -> tuple[torch.dtype, str | None]:
    """(model dtype, weight quantization) that `--dtype auto` loads a checkpoint storing its
    matrices as `stored` ("quantized", "bfloat16", "float16", "float32") with, on `device`."""
    if torch.device(device).type != "cpu":
        return torch.bfloat16, None
    if cpu_kernels.kernels() is None:  # torch's kernels only: its bf16 matmul is fast only where native
        return (torch.bfloat16 if native_bf16() else torch.float32), None
    return torch.float32, {"quantized": "int8", "bfloat16": "bf16", "float16": "bf16"}.get(stored)


def choose(model) -> str:
    """The backend for a model as it is now (device, dtype) on this host."""
    if model.device.type != "cpu" or cpu_kernels.kernels() is None:
        return "torch"
    return {torch.float32: "cpu-kernels", torch.bfloat16: "cpu-attention"}.get(model.dtype, "torch")


def install(model, name: str | None = None):
    """Install backend `name` (default: `choose(model)`) on the model in place; returns the model."""
    name = name or choose(model)
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    _retype(model, _plain_form)
    _STEPS.pop(model, None)
    if name in FORMS:
        _retype(model, FORMS[name])
    if name == "cpu-kernels":
        _STEPS[model] = FusedDecode(model)
    _INSTALLED[model] = name
    return model


def installed(model) -> str:
    """The name of the backend installed on the model ("torch" when none was)."""
    return _INSTALLED.get(model, "torch")


def decode_step(model):
    """What runs a one-token call: the installed backend's step, else the model itself. Both take
    (input_ids, attention_mask=None, *, cache, logits_to_keep) and return logits."""
    return _STEPS.get(model, model)


def _plain_form(module: nn.Module) -> type | None:
    """The model's own class for a module a backend swapped, else None."""
    return type(module).__mro__[1] if type(module).__module__ == cpu.__name__ else None


def _retype(model: nn.Module, form) -> None:
    """Replace every submodule whose `form(module)` names a class by an instance of that class
    holding the same attributes (parameters, buffers, children are shared, not copied)."""
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            cls = form(child) if child is not None else None
            if cls is not None and type(child) is not cls:
                new = cls.__new__(cls)
                new.__dict__.update(child.__dict__)
                parent._modules[name] = new
