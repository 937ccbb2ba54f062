"""A decode step's layers in one C call (`qk_decode_layers` in cpu_kernels.c), for fp32 models on
the CPU with a static `KVCache` (generate, chat, bench) or an engine's paged cache (serve, LLM).

Run from Python, one token through a 0.5B model is ~100 GEMVs and ~250 small operations, each
paying 5-30 us of interpreter and dispatch time: 10-15 ms a step, as much as an int4 step's
arithmetic. The C loop runs the same kernels back to back. It takes dense layers (SwiGLU, no
sliding window) whose linears are fp32, bf16, int8 or qwenkit-layout int4; anything else runs the
modules as usual. `decode_layers` answers False whenever it does not apply.

The plan (one struct of pointers per layer) is built once per model and rebuilt when a layer's
modules or tensors are replaced (quantize, `.to()`) or forward hooks come or go (LoRA adds its
adapters through hooks, which the C loop would skip: a hooked model runs its modules). It holds
references to the tensors it points at, so a stale plan can never read freed memory.
"""

from __future__ import annotations

import ctypes
import operator

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels
from ..model.attention import KVCache
from ..model.layers import GatedMLP, Linear
from .quant import Bf16Linear, Int4Linear, Int8Linear

KINDS = {torch.float32: 0, torch.bfloat16: 1}  # fp32 / bf16 weights; int8 is 2, int4 3
P = ctypes.c_void_p


class _Linear(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int64), ("N", ctypes.c_int64), ("K", ctypes.c_int64), ("w", P), ("scales", P),
                ("mins", P), ("bias", P)]


class _Layer(ctypes.Structure):
    _fields_ = [("ln1", P), ("ln2", P), ("q_norm", P), ("k_norm", P), ("qkv", _Linear), ("o", _Linear),
                ("gate_up", _Linear), ("down", _Linear)]


def _fp32(t: torch.Tensor | None) -> bool:
    return t is None or (t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous())


def _linear(mod, keep: list) -> _Linear | None:
    """The C description of a linear layer, or None for a kind the C loop does not run."""
    bias = getattr(mod, "bias", None)
    if not _fp32(bias):
        return None
    if type(mod) in (Linear, Bf16Linear) and mod.weight.dtype in KINDS and mod.weight.is_contiguous():
        desc = _Linear(KINDS[mod.weight.dtype], *mod.weight.shape, mod.weight.data_ptr(), None, None)
        tensors = [mod.weight]
    elif type(mod) is Int8Linear and mod.scales.dtype == torch.float32:
        desc = _Linear(2, *mod.weight.shape, mod.weight.data_ptr(), mod.scales.data_ptr(), None)
        tensors = [mod.weight, mod.scales]
    elif type(mod) is Int4Linear and mod.own_layout:
        desc = _Linear(3, mod.out_features, mod.in_features, mod.qweight.data_ptr(), mod.scales.data_ptr(),
                       mod.mins.data_ptr())
        tensors = [mod.qweight, mod.scales, mod.mins]
    else:
        return None
    if any(t.device.type != "cpu" for t in tensors):
        return None
    desc.bias = None if bias is None else bias.data_ptr()
    keep.extend([*tensors, bias])
    return desc


_HOOKED = object()  # marks, in a plan's dependencies, a module with forward hooks


def _dependencies(model) -> list:
    """What a plan depends on, compared by identity: every module and tensor the C loop reads, and
    a marker after each module with forward hooks (LoRA adds its adapters through them, and the C
    loop would skip them). Module dicts are read directly: this runs every step."""
    hooked = bool(nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)
    out = [_HOOKED] if hooked else []
    for layer in model.model.layers:
        mods = layer._modules
        attn, mlp = mods["self_attn"], mods["mlp"]
        for m in (layer, attn, mods["input_layernorm"], mods["post_attention_layernorm"], *attn._modules.values(), mlp,
                  *mlp._modules.values()):  # attention's: qkv_proj, o_proj and, with QK-norm, q_norm, k_norm
            out.append(m)
            out.extend(m._parameters.values())
            out.extend(m._buffers.values())
            if m._forward_hooks or m._forward_pre_hooks:
                out.append(_HOOKED)
    return out


class _Plan:
    def __init__(self, model):
        self.depends = _dependencies(model)
        self.keep: list = []  # the tensors the plan points at, kept alive
        cfg = model.config
        n = cfg.num_hidden_layers
        self.layers = (_Layer * n)()
        self.ok = not any(d is _HOOKED for d in self.depends) and all(cfg.window_of(i) is None for i in range(n))
        for i, layer in enumerate(model.model.layers):
            if not self.ok:
                break
            attn, mlp = layer.self_attn, layer.mlp
            norms = [layer.input_layernorm, layer.post_attention_layernorm, attn.q_norm, attn.k_norm]
            if (not isinstance(mlp, GatedMLP) or mlp.act is not F.silu
                    or not all(m is None or _fp32(m.weight) for m in norms)):
                self.ok = False
                break
            linears = [_linear(m, self.keep) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
            if any(d is None for d in linears):
                self.ok = False
                break
            ptrs = [None if m is None else m.weight.data_ptr() for m in norms]
            self.keep.extend(m.weight for m in norms if m is not None)
            self.layers[i] = _Layer(*ptrs, *linears)
        attn = model.model.layers[0].self_attn
        self.shape = (attn.n_heads, attn.n_kv, attn.head_dim, model.model.layers[0].mlp.intermediate if self.ok else 0)
        self.eps = cfg.rms_norm_eps

    def valid_for(self, model) -> bool:
        current = _dependencies(model)
        return len(current) == len(self.depends) and all(map(operator.is_, current, self.depends))


def _static_cache(cache: KVCache, B: int, shape) -> tuple | None:
    """(layout, layer stride, slot positions) of a static cache the plan can write, else None."""
    _, Hkv, D, _ = shape
    if (cache.k.shape[1:] != (B, Hkv, cache.max_len, D) or cache.length + 1 > cache.max_len
            or not (cache.k.is_contiguous() and cache.v.is_contiguous())):
        return None  # the modules then raise their own error (a full cache, a cache of another shape)
    layout = cpu_kernels.Layout(Hkv * cache.max_len * D, cache.max_len * D, D, None, 0, 1)
    return layout, B * Hkv * cache.max_len * D, torch.full((B,), cache.length, dtype=torch.int64)


def _paged_cache(cache, B: int, shape, positions: torch.Tensor | None) -> tuple | None:
    """The same for an engine's paged pool (layers, slots, Hkv, D) read through its block tables."""
    _, Hkv, D, _ = shape
    tables = cache.block_tables
    if (positions is None or positions.shape != (B, 1) or tables.shape[0] != B or cache.k.shape[2:] != (Hkv, D)
            or not cache.v.is_contiguous()):
        return None
    pos = positions[:, 0].contiguous()
    # None: a position without a block, or a block outside the pool: never write there
    layout = cpu_kernels.paged_layout(tables, cache.block_size, cache.k, int(pos.max()) + 1)
    return None if layout is None else (layout, cache.k.shape[1] * Hkv * D, pos)


def decode_layers(model, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask, cache,
                  positions: torch.Tensor | None = None) -> bool:
    """Run every layer on x (B, 1, H) in place, one new token per row, writing K/V to `cache`: a
    static KVCache at its current length, or an engine's paged cache at each row's position
    (`positions` (B, 1)) through the block tables the runner prepared. False (nothing done) when
    the C loop does not apply."""
    B, T, hidden = x.shape
    paged = getattr(cache, "block_tables", None) is not None
    if (T != 1 or not (type(cache) is KVCache or paged) or not cpu_kernels.fp32_inference(x, cache.k)
            or B > cpu_kernels.MAX_ROWS or not x.is_contiguous() or isinstance(mask, list)):
        return False
    plan = getattr(model, "_decode_plan", None)
    if plan is None or not plan.valid_for(model):
        plan = model._decode_plan = _Plan(model)
    if not plan.ok or cache.k.shape[0] != len(plan.layers) or cache.v.shape != cache.k.shape:
        return False
    where = _paged_cache(cache, B, plan.shape, positions) if paged else _static_cache(cache, B, plan.shape)
    if where is None:
        return False
    layout, layer_stride, pos = where
    S = int(pos.max()) + 1
    rows = 0
    if mask is not None:
        if mask.dtype != torch.bool or mask.shape[0] not in (1, B) or mask.shape[1:] != (1, 1, S):
            return False
        rows = mask.shape[0]
        mask = mask.reshape(rows, S).contiguous()
    elif not bool((pos == pos[0]).all()):
        return False  # without a mask every row would see every position up to the longest row's
    H, Hkv, D, I = plan.shape
    cos, sin = cos.reshape(-1, cos.shape[-1]).contiguous(), sin.reshape(-1, sin.shape[-1]).contiguous()
    rc = cpu_kernels.kernels().qk_decode_layers(
        plan.layers, len(plan.layers), x.data_ptr(), B, hidden, H, Hkv, D, I, plan.eps, cos.data_ptr(),
        sin.data_ptr(), cos.shape[0], cache.k.data_ptr(), cache.v.data_ptr(), layer_stride, ctypes.byref(layout),
        pos.data_ptr(), None if mask is None else mask.data_ptr(), rows, torch.get_num_threads())
    cpu_kernels._check(rc, f"the fused decode step does not take a batch of {B} at position {S - 1}")
    return True
