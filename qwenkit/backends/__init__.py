"""Backends: faster forms of the model, installed on a loaded model from outside, chosen once.

The model (`qwenkit/model/`) is the math in plain torch. A backend swaps some of its modules for
forms with the same parameters and a faster `forward`, and may install a decode step (the whole
one-token call done its own way), which `generate` and the engine's runner ask for with
`decode_step(model)`; the engine's runner also asks `paged_step(...)` for its decode call over
the paged pool (a static-buffer step, None where the backend has none). `load_model` calls
`install(model)`; call it again after changing a model's dtype or device.

Which path runs for which (device, host, dtype, phase), and what `--dtype auto` loads
(`auto_plan`), is written down once, in docs/architecture.md ("Which path runs where"); `choose`
and `auto_plan` below are that table in code.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

import os

from ..config import HYBRID_TYPES
from . import cpu, cpu_kernels, cuda
from .cpu import attention_form, cpu_form
from .fused_decode import FusedDecode
from .graphed_step import GraphedDecode, PagedDecode, static_ok
from .host import native_bf16
from .quant import Int4Linear

# "cuda-graphs": one-token steps on static buffers, captured in CUDA graphs on a GPU (run eagerly,
# same buffers, when installed on a CPU model, as the tests do); paged decode reads blocks in place.
BACKENDS = ("cpu-kernels", "cpu-attention", "cuda-graphs", "torch")
FORMS = {"cpu-kernels": cpu_form, "cpu-attention": attention_form}
_STEPS: "weakref.WeakKeyDictionary[nn.Module, FusedDecode | GraphedDecode]" = weakref.WeakKeyDictionary()
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
    """The backend for a model as it is now (device, dtype) on this host. The hybrid lines
    (Gated DeltaNet layers, gated attention, partial rotary, zero-centred norms) run the plain
    modules: the C forms and the fused step are written for the Qwen2/Qwen3 layer, the static
    steps for its cache. QWENKIT_CUDA_GRAPHS=0 keeps a CUDA model on plain torch."""
    if model.config.model_type in HYBRID_TYPES:
        return "torch"
    if model.device.type == "cuda" and os.environ.get("QWENKIT_CUDA_GRAPHS", "1") != "0":
        return "cuda-graphs"
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
    if name == "cuda-graphs":
        if model.device.type == "cuda":
            _retype(model, cuda.quant_form)
        if cuda.kernel_available(model):
            cuda.swap_attention(model)
        _STEPS[model] = GraphedDecode(model, capture=model.device.type == "cuda")
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


def has_paged_step(model) -> bool:
    """Whether `paged_step` gives this model a step (the runner then adds the scratch block)."""
    if installed(model) != "cuda-graphs" or not static_ok(model):
        return False
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return False  # tensor-parallel ranks must run calls of one shape; padding is per rank
    # on CUDA without the in-place kernel the plain op would gather each row's whole table a step
    return model.device.type != "cuda" or cuda.kernel_available(model)


def paged_step(model, pool_k, pool_v, block_size: int, scratch_block: int, max_blocks: int):
    """The engine's decode call over its paged pool on static buffers (`PagedDecode`: padded
    batches, captured on CUDA), or None where the installed backend has none. `scratch_block`: a
    block of the pool no sequence owns (padding rows write there); `max_blocks`: a row's most."""
    if not has_paged_step(model):
        return None
    in_place = isinstance(model.model.layers[0].self_attn.sdpa, cuda.PagedKernelSDPA)
    return PagedDecode(model, pool_k, pool_v, block_size, scratch_block, max_blocks, in_place,
                       capture=model.device.type == "cuda")


def batch_invariant_rows(model) -> int:
    """How many one-token rows one decode call may hold with each row's logits independent of the
    others' (bit for bit): the C kernels' row count where every linear of the model is one of
    qwenkit's GEMVs (int8, own-layout int4, bf16-stored weights: each row's sums run in the same
    order whatever the batch; norms, rope and attention run per row in C too), else 1 - torch's GEMMs pick their kernel by the row count (fp32 rows
    1-3 and 4+ sum differently on the hosts measured), so such a model decodes a row per call."""
    if installed(model) != "cpu-kernels":
        return 1
    for m in model.modules():  # hooks (LoRA adapters) add their own torch matmuls
        if isinstance(m, nn.Linear) or (isinstance(m, Int4Linear) and not m.own_layout) or m._forward_hooks:
            return 1
    return cpu_kernels.MAX_ROWS


def _plain_form(module: nn.Module) -> type | None:
    """The model's own class for a module a backend swapped, else None."""
    return type(module).__mro__[1] if type(module).__module__ in (cpu.__name__, cuda.__name__) else None


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
