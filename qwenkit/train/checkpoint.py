"""Training checkpoints: one file per save holding the model (or, with LoRA, only the adapters),
optimizer, scheduler, data position, RNG states and both configs, written atomically.

A save goes to `<name>.tmp` and is renamed into place, so a run killed at any instant leaves
either the previous checkpoint or the new one, never a torn file. Under DDP/FSDP the state is
gathered into full tensors (torch.distributed.checkpoint.state_dict) and rank 0 writes it.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                     set_state_dict)

from ..errors import CheckpointError

_NAME = re.compile(r"step-(\d+)\.pt$")


def _options(lora: bool) -> StateDictOptions:
    return StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=lora)


def save_checkpoint(ckpt_dir: Path, step: int, model, optimizer, scheduler, *, position: int,
                    model_config: dict, train_config: dict, lora: bool, rank: int = 0, keep: int = 2) -> Path | None:
    """Every rank calls this (FSDP gathers collectively); rank 0 writes. Returns the path on rank 0."""
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options(lora))
    if rank != 0:
        return None
    state = {
        "step": step, "position": position, "model": model_sd, "optimizer": optim_sd,
        "scheduler": scheduler.state_dict(), "model_config": model_config, "train_config": train_config,
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
    }
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"step-{step:08d}.pt"
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    with open(tmp, "rb") as f:  # the bytes reach the disk before the rename makes them visible
        os.fsync(f.fileno())
    os.replace(tmp, path)
    for old in list_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first (temporary files of an interrupted save are ignored)."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name)[1]))


def resolve_resume(resume: str, ckpt_dir: Path) -> Path | None:
    """"" -> None; "auto" -> the latest checkpoint if any; else the named file, which must exist."""
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(ckpt_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    return path


def load_checkpoint(path: Path, model, optimizer, scheduler, *, model_config: dict, lora: bool) -> dict:
    """Restore everything in place; returns {"step", "position"}. Refuses a checkpoint of another shape."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file
        raise CheckpointError(f"{path}: not a readable qwenkit training checkpoint ({e})") from None
    _check_same_model(path, state.get("model_config", {}), model_config)
    _check_shapes(path, state["model"], model, lora)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=_options(lora))
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return {"step": state["step"], "position": state["position"]}


_SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "num_experts", "moe_intermediate_size", "model_type")


def _check_same_model(path: Path, saved: dict, current: dict) -> None:
    diffs = [f"{k}={saved.get(k)!r} (this run: {current.get(k)!r})" for k in _SHAPE_FIELDS
             if saved.get(k) != current.get(k)]
    if diffs:
        raise CheckpointError(f"{path}: checkpoint is for a model of another shape: {', '.join(diffs)}")


def _check_shapes(path: Path, saved: dict, model, lora: bool) -> None:
    mine = {n: p for n, p in _plain_names(model) if p.requires_grad or not lora}
    for name, t in saved.items():
        if name in mine and tuple(mine[name].shape) != tuple(t.shape):
            raise CheckpointError(f"{path}: tensor {name} has shape {list(t.shape)}, "
                                  f"this run's model has {list(mine[name].shape)}")


def _plain_names(model):
    for name, p in model.named_parameters():
        yield name.removeprefix("module."), p
