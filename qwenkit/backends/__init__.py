"""Backends: faster forms of the model, installed on a loaded model from outside, chosen once.

The model (`qwenkit/model/`) is the math in plain torch. A backend swaps some of its modules for
forms with the same parameters and a faster `forward`, and may install a decode step (the whole
one-token call done its own way), which `generate` and the engine's runner ask for with
`decode_step(model)`. `load_model` calls `install(model)`; call it again after changing a
model's dtype or device.

Which path runs for which (device, host, dtype, phase), and what `--dtype auto` loads
(`auto_plan`), is written down once, in docs/architecture.md ("Which path runs where"); `choose`
and `auto_plan` below are that table in code.
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
    """The backend for a model as it is now (device, dtype) on this host. Hybrid models (Gated
    DeltaNet layers, partial rotary, zero-centred norms) run the plain modules: the C forms and
    the fused step are written for the attention-only layer."""
    if model.device.type != "cpu" or cpu_kernels.kernels() is None or model.config.is_hybrid:
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


def verify_step(model):
    """What runs a speculative verify call, (input_ids (1, T), *, cache) -> logits (1, T, V) on a
    static cache: the installed step's `verify` (each row as the one-token step computes it), else
    the model's forward."""
    step = _STEPS.get(model)
    return step.verify if step is not None else lambda input_ids, *, cache: model(input_ids, cache=cache)


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
