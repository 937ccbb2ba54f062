"""Checkpoint tensor names -> slices of qwenkit's (partly fused) parameters, and the loading loop.

Checkpoints name q/k/v and gate/up separately and store experts either one by one
(`mlp.experts.3.up_proj.weight`), stacked per projection (GGUF: `mlp.experts.up_proj`) or
stacked and fused (`mlp.experts.gate_up_proj`). Every form lands in the same fused parameter.
The hybrids' DeltaNet projections land in one `linear_attn.in_proj` (rows [q | k | v | z | b | a]),
from Qwen3.5's four tensors or Qwen3-Next's two per-key-head interleaved ones (split first,
`pieces`). A multimodal checkpoint's text part (`model.language_model.*`) loads as the model; its
vision tower (`model.visual.*`) is skipped and counted, and multi-token-prediction weights
(`mtp.*`) are kept aside (`Leftovers`), for a speculative decoder to use.
Each copy is checked for shape, and at the end every parameter must be covered exactly once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from ..errors import CheckpointError

# Tensors some checkpoints carry that the model recomputes.
IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
_QKV = re.compile(r"(.*\.self_attn)\.([qkv])_proj\.(weight|bias)$")
_GATE_UP = re.compile(r"(.*(?:\.mlp|\.shared_expert))\.(gate|up)_proj\.weight$")
_EXPERT = re.compile(r"(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")
_STACKED = re.compile(r"(.*\.mlp\.experts)\.(gate|up)_proj$")
_IN_PROJ = re.compile(r"(.*\.linear_attn)\.in_proj_(qkv|z|b|a)\.weight$")
_INTERLEAVED = re.compile(r"(.*\.linear_attn)\.in_proj_(qkvz|ba)\.weight$")
_VISION = re.compile(r"^(model\.)?visual\.")
_MTP = re.compile(r"^mtp\.")

Slicer = Callable[[torch.Tensor], torch.Tensor]


def target(name: str, cfg) -> tuple[str, Slicer]:
    """(parameter name, function selecting the destination view) for a checkpoint tensor name."""
    if m := _QKV.match(name):
        q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        q *= 2 if cfg.attn_output_gate else 1  # per head [query | gate]
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
    if m := _IN_PROJ.match(name):
        key, value, nv = cfg.linear_num_key_heads * cfg.linear_key_head_dim, \
            cfg.linear_num_value_heads * cfg.linear_value_head_dim, cfg.linear_num_value_heads
        start, size = {"qkv": (0, 2 * key + value), "z": (2 * key + value, value),
                       "b": (2 * key + 2 * value, nv), "a": (2 * key + 2 * value + nv, nv)}[m[2]]
        return f"{m[1]}.in_proj.weight", lambda p: p[start : start + size]
    return name, lambda p: p


def pieces(name: str, tensor: torch.Tensor, cfg) -> list[tuple[str, torch.Tensor]]:
    """A checkpoint tensor as the tensors `target` maps: Qwen3-Next's in_proj_qkvz (per key head
    [q, k, v, z]) and in_proj_ba (per key head [b, a]) become Qwen3.5's in_proj_qkv/z/b/a."""
    m = _INTERLEAVED.match(name)
    if m is None:
        return [(name, tensor)]
    nk, dk, dv = cfg.linear_num_key_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim
    r = cfg.linear_num_value_heads // nk
    if hasattr(tensor, "materialize"):
        tensor = tensor.materialize()
    per_head = tensor.reshape(nk, -1, tensor.shape[-1])  # (nk, rows per key head, H)
    if m[2] == "ba":
        b, a = per_head.split((r, r), dim=1)
        return [(f"{m[1]}.in_proj_b.weight", b.reshape(-1, b.shape[-1])),
                (f"{m[1]}.in_proj_a.weight", a.reshape(-1, a.shape[-1]))]
    q, k, v, z = (t.reshape(-1, t.shape[-1]) for t in per_head.split((dk, dk, r * dv, r * dv), dim=1))
    return [(f"{m[1]}.in_proj_qkv.weight", torch.cat((q, k, v))), (f"{m[1]}.in_proj_z.weight", z)]


@dataclass
class Leftovers:
    """What a checkpoint holds beside the model: MTP tensors kept by name, vision tensors counted."""

    mtp: dict[str, torch.Tensor] = field(default_factory=dict)
    vision_skipped: int = 0


def _text_name(name: str) -> str:
    return "model." + name[len("model.language_model."):] if name.startswith("model.language_model.") else name


@torch.no_grad()
def load_tensors(model, tensors: Iterable[tuple[str, torch.Tensor, str]], source: str,
                 on_filled: Callable[[str], None] | None = None,
                 take: Callable[[str, torch.Tensor], bool] | None = None) -> Leftovers:
    """Copy checkpoint tensors into the model's (already allocated) parameters, checking everything.

    `on_filled(name)` runs as each parameter becomes complete; by then this loop holds no reference
    to it, so the callback may replace its module (quantize on load) and let its storage go.
    `take(name, tensor)` is offered each tensor that is a whole parameter by itself before it is
    copied; when it returns True it has used the tensor (quantized from it) and the parameter
    counts as complete without being filled. Returns what the checkpoint held beside the model."""
    params = dict(model.named_parameters(remove_duplicate=False))
    sizes = {pname: p.numel() for pname, p in params.items()}
    tied = model.config.tie_word_embeddings
    filled: dict[str, int] = {}
    seen: set[str] = set()
    left = Leftovers()
    for name, tensor, file in _named_pieces(tensors, model.config, left):
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
    return left


def _named_pieces(tensors, cfg, left: Leftovers):
    """The stream under the model's names, vision tensors counted and MTP ones set aside."""
    for name, tensor, file in tensors:
        if _VISION.match(name):
            left.vision_skipped += 1
        elif _MTP.match(name):
            left.mtp[name] = tensor.materialize() if hasattr(tensor, "materialize") else tensor
        else:
            for piece, part in pieces(_text_name(name), tensor, cfg):
                yield piece, part, file


def _check_complete(sizes, filled, source, tied) -> None:
    for pname, size in sizes.items():
        if tied and pname == "lm_head.weight":
            continue
        got = filled.get(pname, 0)
        if got != size:
            what = "missing" if got == 0 else f"only partly present ({got} of {size} values)"
            raise CheckpointError(f"{source}: tensor for {pname} is {what}")
