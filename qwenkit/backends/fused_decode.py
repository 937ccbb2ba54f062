"""A decode step's layers in one C call (`qk_decode_layers` in cpu_kernels.c), for fp32 models on
the CPU with a static `KVCache` (generate, chat, bench) or an engine's paged cache (serve, LLM).

Run from Python, one token through a 0.5B model is ~100 GEMVs and ~250 small operations, each
paying 5-30 us of interpreter and dispatch time: 10-15 ms a step, as much as an int4 step's
arithmetic. The C loop runs the same kernels back to back. It takes dense layers (SwiGLU, no
sliding window) whose linears are fp32, bf16, int8 or qwenkit-layout int4; anything else runs the
modules as usual. `FusedDecode` is installed by the backend as the model's decode step
(`backends.decode_step`): `generate` and the engine's runner call it for one-token steps, and it
runs the modules itself for whatever the C loop does not take, so callers always get logits.

The plan (one struct of pointers per layer) is built once per model and rebuilt when a layer's
modules or tensors are replaced (quantize, `.to()`) or forward hooks come or go (LoRA adds its
adapters through hooks, which the C loop would skip: a hooked model runs its modules). It holds
references to the tensors it points at, so a stale plan can never read freed memory.
"""

from __future__ import annotations

import ctypes
import operator

import torch
from torch import nn

from ..model.layers import GatedMLP
from . import cpu_kernels
from .cpu import CpuLinear, kernel_layout
from .quant import Bf16Linear, Int4Linear, Int8Linear

KINDS = {torch.float32: 0, torch.bfloat16: 1}  # fp32 / bf16 weights; int8 is 2, int4 3
P = ctypes.c_void_p
# lm_head forms whose rows, up to MAX_ROWS, go through the GEMVs above, each row's arithmetic the
# same whatever the rows: the verify step runs them at once; others (fp32's CpuLinear: torch for
# one row, the GEMV for several) one row at a time, as the one-token step does.
ROW_INVARIANT = (Int8Linear, Int4Linear, Bf16Linear)


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
    if type(mod) in (nn.Linear, CpuLinear, Bf16Linear) and mod.weight.dtype in KINDS and mod.weight.is_contiguous():
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
            if (not isinstance(mlp, GatedMLP) or mlp.act_fn.name != "silu"
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


class FusedDecode:
    """`step(input_ids, cache=..., attention_mask=None, logits_to_keep=1)` -> logits, like the
    model's forward, for one-token calls; the C loop runs the layers when it takes them."""

    def __init__(self, model):
        self.model = model
        self.plan = None

    def __call__(self, input_ids, attention_mask=None, *, cache, logits_to_keep: int = 0) -> torch.Tensor:
        model = self.model
        x, cos, sin, masks = model.begin(input_ids, attention_mask, cache)
        if not self._run_fused(x, cos, sin, masks, cache):
            x = model.run_layers(x, cos, sin, masks, cache)
        return model.finish(x, cache, input_ids.shape[1], logits_to_keep)

    def verify(self, input_ids, *, cache) -> torch.Tensor:
        """Logits (1, T, V) for T successive tokens of one sequence (a speculative step's last token
        and its proposals) on a static cache: row i equal, bit for bit, to what the one-token step
        gives at that position, the layers' weights read once for all rows. Runs the modules
        (another reduction order) where the C loop does not apply."""
        model = self.model
        x, cos, sin, masks = model.begin(input_ids, None, cache)
        if not self._run_verify(x, cos, sin, cache):
            x = model.run_layers(x, cos, sin, masks, cache)
            return model.finish(x, cache, input_ids.shape[1])
        cache.end(input_ids.shape[1])
        h = model.model.norm(x)  # (1, T, H): row by row
        if type(model.lm_head) in ROW_INVARIANT:
            return model.lm_head(h).float()
        return torch.cat([model.lm_head(h[:, i:i + 1]) for i in range(h.shape[1])], 1).float()

    def _run_verify(self, x, cos, sin, cache) -> bool:
        """qk_verify_layers on x (1, T, H) in place; False (nothing done) where it does not apply."""
        B, T, hidden = x.shape
        if B != 1 or T > cpu_kernels.MAX_ROWS or x.dtype != torch.float32 or not x.is_contiguous():
            return False
        plan = self._current_plan()
        slots = cache.slots()
        if not plan.ok or slots.tables is not None or not _takes(slots, 1, plan):
            return False
        layout = cpu_kernels.Layout(0, slots.sh, slots.ss, None, 0, 1)  # sb 0: every row is row 0 of the cache
        pos = slots.write_at[0] + torch.arange(T)  # (T,)
        H, Hkv, D, I = plan.shape
        cos, sin = cos.reshape(T, -1).contiguous(), sin.reshape(T, -1).contiguous()
        rc = cpu_kernels.kernels().qk_verify_layers(
            plan.layers, len(plan.layers), x.data_ptr(), T, hidden, H, Hkv, D, I, plan.eps, cos.data_ptr(),
            sin.data_ptr(), T, slots.k.data_ptr(), slots.v.data_ptr(), slots.layer_stride, ctypes.byref(layout),
            pos.data_ptr(), torch.get_num_threads())
        cpu_kernels._check(rc, f"the verify step does not take {T} tokens at position {int(pos[0])}")
        return True

    def _current_plan(self) -> _Plan:
        if self.plan is None or not self.plan.valid_for(self.model):
            self.plan = _Plan(self.model)
        return self.plan

    def _run_fused(self, x, cos, sin, masks, cache) -> bool:
        """Every layer on x (B, 1, H) in place, writing K/V where `cache.slots()` says; False
        (nothing done) where the C loop does not apply."""
        B, T, hidden = x.shape
        if T != 1 or B > cpu_kernels.MAX_ROWS or x.dtype != torch.float32 or not x.is_contiguous() \
                or len({id(m) for m in masks}) != 1:  # one mask for all layers: no sliding windows
            return False
        plan = self._current_plan()
        slots = cache.slots()
        if not plan.ok or not _takes(slots, B, plan):
            return False
        layout = kernel_layout(slots)
        mask, rows = masks[0], 0
        if layout is None:
            return False
        if mask is not None:
            rows = mask.shape[0]
            if mask.dtype != torch.bool or rows not in (1, B) or mask.shape[1:] != (1, 1, slots.read_len):
                return False
            mask = mask.reshape(rows, slots.read_len).contiguous()
        elif not bool((slots.write_at == slots.write_at[0]).all()):
            return False  # without a mask every row would see every position up to the longest row's
        H, Hkv, D, I = plan.shape
        cos, sin = cos.reshape(-1, cos.shape[-1]).contiguous(), sin.reshape(-1, sin.shape[-1]).contiguous()
        pos = slots.write_at
        rc = cpu_kernels.kernels().qk_decode_layers(
            plan.layers, len(plan.layers), x.data_ptr(), B, hidden, H, Hkv, D, I, plan.eps, cos.data_ptr(),
            sin.data_ptr(), cos.shape[0], slots.k.data_ptr(), slots.v.data_ptr(), slots.layer_stride,
            ctypes.byref(layout), pos.data_ptr(), None if mask is None else mask.data_ptr(), rows,
            torch.get_num_threads())
        cpu_kernels._check(rc, f"the fused decode step does not take a batch of {B} at position {int(pos.max())}")
        return True


def _takes(slots, B: int, plan: _Plan) -> bool:
    """Whether the cache's storage is what the C loop writes: fp32 on the CPU, contiguous, the
    plan's layers and heads, a position for each of the B rows inside the storage."""
    _, Hkv, D, _ = plan.shape
    k, v = slots.k, slots.v
    if (k.dtype != torch.float32 or k.device.type != "cpu" or k.shape != v.shape or not k.is_contiguous()
            or not v.is_contiguous() or k.shape[0] != len(plan.layers) or slots.write_at.shape != (B,)):
        return False
    if slots.tables is None:  # static (layers, B, Hkv, max_len, D): a full cache raises in the modules
        return k.shape[1:] == (B, Hkv, k.shape[3], D) and slots.read_len <= k.shape[3]
    return k.shape[2:] == (Hkv, D) and slots.tables.shape[0] == B
