"""Checkpoint tensor names -> slices of qwenkit's (partly fused) parameters, and the loading loop.

Checkpoints name q/k/v and gate/up separately and store experts either one by one
(`mlp.experts.3.up_proj.weight`), stacked per projection (GGUF: `mlp.experts.up_proj`) or
stacked and fused (`mlp.experts.gate_up_proj`). Every form lands in the same fused parameter.
Each copy is checked for shape, and at the end every parameter must be covered exactly once.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable

import torch

from ..errors import CheckpointError

# Tensors some checkpoints carry that the model recomputes.
IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
_QKV = re.compile(r"(.*\.self_attn)\.([qkv])_proj\.(weight|bias)$")
_GATE_UP = re.compile(r"(.*(?:\.mlp|\.shared_expert))\.(gate|up)_proj\.weight$")
_EXPERT = re.compile(r"(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")
_STACKED = re.compile(r"(.*\.mlp\.experts)\.(gate|up)_proj$")

Slicer = Callable[[torch.Tensor], torch.Tensor]


def target(name: str, cfg) -> tuple[str, Slicer]:
    """(parameter name, function selecting the destination view) for a checkpoint tensor name."""
    if m := _QKV.match(name):
        q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        start = {"q": 0, "k": q, "v": q + kv}[m[2]]
        size = q if m[2] == "q" else kv
        return f"{m[1]}.qkv_proj.{m[3]}", lambda p: p[start : start + size]
    if m := _GATE_UP.match(name):
        half = 0 if m[2] == "gate" else 1
        return f"{m[1]}.gate_up_proj.weight", lambda p: p.chunk(2, dim=0)[half]
    if m := _EXPERT.match(name):
        e = int(m[2])
        if m[3] == "down":
            return f"{m[1]}.down_proj", lambda p: p[e]
        half = 0 if m[3] == "gate" else 1
        return f"{m[1]}.gate_up_proj", lambda p: p[e].chunk(2, dim=0)[half]
    if m := _STACKED.match(name):
        half = 0 if m[2] == "gate" else 1
        return f"{m[1]}.gate_up_proj", lambda p: p.chunk(2, dim=1)[half]
    return name, lambda p: p


@torch.no_grad()
def load_tensors(model, tensors: Iterable[tuple[str, torch.Tensor, str]], source: str,
                 on_filled: Callable[[str], None] | None = None,
                 take: Callable[[str, torch.Tensor], bool] | None = None) -> None:
    """Copy checkpoint tensors into the model's (already allocated) parameters, checking everything.

    `on_filled(name)` runs as each parameter becomes complete; by then this loop holds no reference
    to it, so the callback may replace its module (quantize on load) and let its storage go.
    `take(name, tensor)` is offered each tensor that is a whole parameter by itself before it is
    copied; when it returns True it has used the tensor (quantized from it) and the parameter
    counts as complete without being filled."""
    params = dict(model.named_parameters(remove_duplicate=False))
    sizes = {pname: p.numel() for pname, p in params.items()}
    tied = model.config.tie_word_embeddings
    filled: dict[str, int] = {}
    seen: set[str] = set()
    for name, tensor, file in tensors:
        if IGNORED.match(name) or (tied and name == "lm_head.weight"):
            continue
        if name in seen:
            raise CheckpointError(f"{file}: tensor {name} appears twice")
        seen.add(name)
        pname, slicer = target(name, model.config)
        if pname not in sizes:
            raise CheckpointError(f"{file}: unexpected tensor {name} (the model has no parameter {pname})")
        if pname not in params:
            raise CheckpointError(f"{file}: tensor {name} writes {pname} again after it was complete")
        dest = slicer(params[pname])
        if tuple(dest.shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{file}: tensor {name} has shape {list(tensor.shape)}, the model expects {list(dest.shape)}"
            )
        if take is not None and pname not in filled and dest.numel() == sizes[pname] and take(pname, tensor):
            del params[pname], dest
            filled[pname] = sizes[pname]
            continue
        if hasattr(tensor, "copy_into"):  # a lazily dequantized tensor fills itself in blocks
            tensor.copy_into(dest)
        else:
            dest.copy_(tensor)
        filled[pname] = filled.get(pname, 0) + dest.numel()
        if filled[pname] == sizes[pname]:
            del params[pname], dest
            if on_filled is not None:
                on_filled(pname)
    _check_complete(sizes, filled, source, tied)


def _check_complete(sizes, filled, source, tied) -> None:
    for pname, size in sizes.items():
        if tied and pname == "lm_head.weight":
            continue
        got = filled.get(pname, 0)
        if got != size:
            what = "missing" if got == 0 else f"only partly present ({got} of {size} values)"
            raise CheckpointError(f"{source}: tensor for {pname} is {what}")
