"""LoRA as a transform applied to a model from outside: `apply_lora(model, ...)` attaches low-rank
adapters to the attention and MLP projections through forward hooks, leaving the model's own
code and parameter names untouched.

The model fuses q/k/v into one `qkv_proj` and gate/up into one `gate_up_proj`. An adapter on a
fused projection keeps one (A, B) pair per part, so its update is block-structured and exactly
equal to separate LoRA on q_proj, k_proj and v_proj: adapters save in PEFT's per-module layout
(`adapter_config.json` + `adapter_model.safetensors`) and load into PEFT/transformers unchanged.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError

# qwenkit's projection -> the per-part names checkpoints (and PEFT) use, with each part's share.
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
PLAIN = ("o_proj", "down_proj")
PEFT_PREFIX = "base_model.model."
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


class LoRA(nn.Module):
    """Low-rank update of one (possibly fused) linear: delta = scale * B_p A_p dropout(x) per part."""

    def __init__(self, in_features: int, parts: dict[str, tuple[int, int]], out_features: int,
                 r: int, alpha: float, dropout: float):
        super().__init__()
        self.parts = parts  # part name -> (row offset, rows) in the base weight
        self.out_features, self.scale = out_features, alpha / r
        self.A = nn.ParameterDict({p: nn.Parameter(torch.zeros(r, in_features)) for p in parts})
        self.B = nn.ParameterDict({p: nn.Parameter(torch.zeros(size, r)) for p, (_, size) in parts.items()})
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged, self.enabled = False, True

    def reset(self, generator: torch.Generator) -> None:
        """PEFT's init: A ~ kaiming-uniform(a=sqrt(5)), B = 0, so a new adapter changes nothing."""
        with torch.no_grad():
            for a in self.A.values():
                bound = 1 / math.sqrt(a.shape[1])
                a.copy_(torch.rand(a.shape, generator=generator) * 2 * bound - bound)
            for b in self.B.values():
                b.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> delta (..., out) with zeros on rows of parts that carry no adapter."""
        x = self.dropout(x.to(next(iter(self.A.values())).dtype))
        pieces, row = [], 0
        for p, (start, size) in self.parts.items():
            if start > row:
                pieces.append(x.new_zeros(*x.shape[:-1], start - row))
            pieces.append((x @ self.A[p].T) @ self.B[p].T * self.scale)  # (..., size)
            row = start + size
        if row < self.out_features:
            pieces.append(x.new_zeros(*x.shape[:-1], self.out_features - row))
        return torch.cat(pieces, dim=-1)

    @torch.no_grad()
    def delta_weight(self, part: str) -> torch.Tensor:
        return (self.B[part].float() @ self.A[part].float()) * self.scale  # (size, in)


def _hook(module, args, output):
    lora = module.lora
    if lora.merged or not lora.enabled:
        return output
    return output + lora(args[0]).to(output.dtype)


def target_parts(name: str, linear: nn.Linear, cfg, targets: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """{checkpoint part name: (row offset, rows)} of a projection that `targets` (q, k, ...) select."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "qkv_proj":
        q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        spans = {"q_proj": (0, q), "k_proj": (q, kv), "v_proj": (q + kv, kv)}
    elif leaf == "gate_up_proj":
        half = linear.out_features // 2
        spans = {"gate_proj": (0, half), "up_proj": (half, half)}
    elif leaf in PLAIN:
        spans = {leaf: (0, linear.out_features)}
    else:
        return {}
    return {p: s for p, s in spans.items() if p.removesuffix("_proj") in targets}


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               targets: tuple[str, ...] = TARGETS, seed: int = 0) -> nn.Module:
    """Freeze the model and attach adapters to every targeted projection (in place; returns model)."""
    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise ValueError(f"unknown LoRA targets {sorted(unknown)}")
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or hasattr(module, "lora"):
            continue
        parts = target_parts(name, module, model.config, tuple(targets))
        if not parts:
            continue
        lora = LoRA(module.in_features, parts, module.out_features, r, alpha, dropout)
        lora.to(device=module.weight.device)
        lora.reset(gen)
        module.lora = lora
        module._lora_hook = module.register_forward_hook(_hook)
    return model


def lora_modules(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and hasattr(m, "lora")]


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """Add each adapter's update into its base weight (inference at base speed)."""
    for _, m in lora_modules(model):
        if not m.lora.merged:
            _add_delta(m, +1)
            m.lora.merged = True


@torch.no_grad()
def unmerge_lora(model: nn.Module) -> None:
    """Subtract merged updates again (exact up to the base dtype's rounding)."""
    for _, m in lora_modules(model):
        if m.lora.merged:
            _add_delta(m, -1)
            m.lora.merged = False


def _add_delta(m: nn.Linear, sign: int) -> None:
    for p, (start, size) in m.lora.parts.items():
        w = m.weight[start : start + size]
        w.copy_((w.float() + sign * m.lora.delta_weight(p)).to(w.dtype))


def remove_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Detach every adapter (merging it first unless merge=False); the model is plain again."""
    if merge:
        merge_lora(model)
    for _, m in lora_modules(model):
        if m.lora.merged and not merge:
            _add_delta(m, -1)
        m._lora_hook.remove()
        del m.lora, m._lora_hook
    return model


@contextlib.contextmanager
def lora_disabled(model: nn.Module):
    """The base model's outputs (the GRPO/DPO reference) without a second copy of the weights."""
    mods = [m for _, m in lora_modules(model)]
    states = [m.lora.enabled for m in mods]
    for m in mods:
        m.lora.enabled = False
    try:
        yield model
    finally:
        for m, s in zip(mods, states):
            m.lora.enabled = s


# ---- PEFT layout ---------------------------------------------------------------------------------

def peft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors under PEFT's names: base_model.model.<module>.<q_proj|...>.lora_A.weight."""
    out = {}
    for name, m in lora_modules(model):
        prefix = name.rsplit(".", 1)[0]
        for p in m.lora.parts:
            for kind, table in (("lora_A", m.lora.A), ("lora_B", m.lora.B)):
                t = table[p].detach()
                t = t.full_tensor() if hasattr(t, "full_tensor") else t  # FSDP2 shards
                out[f"{PEFT_PREFIX}{prefix}.{p}.{kind}.weight"] = t.float().cpu().contiguous()
    return out


def save_adapter(model: nn.Module, out_dir: str | Path, base_model: str = "", rank: int = 0) -> Path:
    """Write adapter_config.json + adapter_model.safetensors (every rank calls; rank 0 writes)."""
    from safetensors.torch import save_file

    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model carries no LoRA adapters")
    lora = mods[0][1].lora
    parts = sorted({p for _, m in mods for p in m.lora.parts})
    r = next(iter(lora.A.values())).shape[0]
    dropout = lora.dropout.p if isinstance(lora.dropout, nn.Dropout) else 0.0
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": lora.scale * r,
              "lora_dropout": dropout, "target_modules": parts, "bias": "none", "fan_in_fan_out": False,
              "base_model_name_or_path": base_model, "inference_mode": True, "init_lora_weights": True,
              "use_rslora": False, "use_dora": False, "modules_to_save": None, "rank_pattern": {},
              "alpha_pattern": {}}
    out = Path(out_dir)
    tensors = peft_state_dict(model)  # collective under FSDP
    if rank != 0:
        return out
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


def read_adapter(adapter_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor], str]:
    """(adapter_config.json, tensors, weights file name) of a PEFT LoRA adapter directory, checked."""
    from safetensors.torch import load_file

    root = Path(adapter_dir)
    cfg_path, weights = root / "adapter_config.json", root / "adapter_model.safetensors"
    if not cfg_path.is_file() or not weights.is_file():
        raise CheckpointError(f"{root}: not a LoRA adapter (want adapter_config.json and adapter_model.safetensors)")
    try:
        config = json.loads(cfg_path.read_text())
        rank, _ = int(config["r"]), float(config["lora_alpha"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{cfg_path}: not a LoRA config ({type(e).__name__}: {e})") from None
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora") or config.get("use_rslora"):
        raise CheckpointError(f"{cfg_path}: only plain LoRA adapters are supported")
    if rank < 1:
        raise CheckpointError(f"{cfg_path}: want r >= 1, not {rank}")
    return config, load_file(str(weights)), str(weights)


def adapter_targets(tensors: dict[str, torch.Tensor], source: str) -> tuple[str, ...]:
    """The short target names (q, k, v, o, gate, up, down) an adapter's tensors hold, read from
    their names (a config's `target_modules` may be a pattern such as "all-linear")."""
    targets = {k.split(".lora_")[0].rsplit(".", 1)[-1].removesuffix("_proj") for k in tensors}
    unknown = sorted(targets - set(TARGETS))
    if unknown or not targets:
        raise CheckpointError(f"{source}: LoRA on {unknown or 'nothing'}; qwenkit adapts {', '.join(TARGETS)}")
    return tuple(t for t in TARGETS if t in targets)


def apply_adapter(model: nn.Module, adapter_dir: str | Path, merge: bool = True) -> nn.Module:
    """Load a PEFT LoRA adapter directory onto a qwenkit model (in place; returns it).

    merge=True folds the update into the weights (plain model, base speed); merge=False keeps it
    live (to continue training, or to toggle with `lora_disabled`).
    """
    config, tensors, source = read_adapter(adapter_dir)
    apply_lora(model, int(config["r"]), float(config["lora_alpha"]), 0.0, adapter_targets(tensors, source))
    load_peft_tensors({name: m.lora for name, m in lora_modules(model)}, tensors, source)
    if merge:
        remove_lora(model, merge=True)
    return model


@torch.no_grad()
def load_peft_tensors(loras: dict[str, LoRA], tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy PEFT-named tensors into the adapters of `loras` ({module name: LoRA}); every tensor
    must find its place and every place its tensor."""
    expected = {}
    for name, lora in loras.items():
        prefix = name.rsplit(".", 1)[0]
        for p in lora.parts:
            expected[f"{PEFT_PREFIX}{prefix}.{p}.lora_A.weight"] = lora.A[p]
            expected[f"{PEFT_PREFIX}{prefix}.{p}.lora_B.weight"] = lora.B[p]
    for key, t in tensors.items():
        key = key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        if key not in expected:
            raise CheckpointError(f"{source}: tensor {key} matches no projection of this model")
        dest = expected.pop(key)
        if dest.shape != t.shape:
            raise CheckpointError(f"{source}: tensor {key} has shape {list(t.shape)}, the model expects {list(dest.shape)}")
        dest.copy_(t)
    if expected:
        raise CheckpointError(f"{source}: adapter tensor {next(iter(expected))} is missing")
