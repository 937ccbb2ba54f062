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
| CPU | bf16 | torch: oneDNN bf16 GEMM (AVX512-BF16, AMX) | torch modules |
| CUDA | any | torch: cuBLAS, SDPA | torch modules |
| anything else (no AVX2, no compiler, QWENKIT_CPU_KERNELS=0) | any | torch | torch |

Each row is a `BACKENDS` entry; `choose(model)` picks one from the model's device and dtype and
from what the host has (`cpu_kernels.kernels()` is None where the C kernels cannot run).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from . import cpu, cpu_kernels
from .cpu import cpu_form
from .fused_decode import FusedDecode

BACKENDS = ("cpu-kernels", "torch")
_STEPS: "weakref.WeakKeyDictionary[nn.Module, FusedDecode]" = weakref.WeakKeyDictionary()
_INSTALLED: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()


def choose(model) -> str:
    """The backend for a model as it is now (device, dtype) on this host."""
    if model.device.type == "cpu" and model.dtype == torch.float32 and cpu_kernels.kernels() is not None:
        return "cpu-kernels"
    return "torch"


def install(model, name: str | None = None):
    """Install backend `name` (default: `choose(model)`) on the model in place; returns the model."""
    name = name or choose(model)
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    _retype(model, _plain_form)
    _STEPS.pop(model, None)
    if name == "cpu-kernels":
        _retype(model, cpu_form)
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
