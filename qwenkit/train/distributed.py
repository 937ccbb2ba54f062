"""Data parallelism under torchrun: DDP (replicated weights) or FSDP2 (`fully_shard`, sharded
weights, gradients and optimizer state), NCCL on GPUs and gloo on CPUs.

Without torchrun (no WORLD_SIZE) everything here is a no-op on one process, so the loop has one
code path. Each rank takes its slice of the global batch; gradients are averaged across ranks,
and the loop scales losses by the global unit count, so N ranks equal one rank with the same
global batch.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..dtypes import resolve_device
from ..errors import ConfigError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(pref: str) -> torch.device:
    try:
        return torch.device(resolve_device(pref))
    except ConfigError as e:
        raise ConfigError(f"run.device: {e}") from None


def init_distributed(device_pref: str) -> Dist:
    """Join the torchrun process group when launched by torchrun; else a single process."""
    device = pick_device(device_pref)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device=device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local, device)


def shutdown(d: Dist) -> None:
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, d: Dist, mode: str) -> nn.Module:
    """The model as the training step should call it: itself, DDP-wrapped, or fully sharded."""
    if d.world == 1:
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [d.device.index] if d.device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(d.device.type, (d.world,))
    for layer in model.model.layers:  # one all-gather per decoder layer, freed after use
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and hasattr(model, "no_sync") else model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Skip the cross-rank gradient reduction on all but the last accumulation micro-batch."""
    if enabled:
        yield
    elif hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def all_reduce_sum(values: list[float], d: Dist) -> list[float]:
    """Sum a list of numbers over ranks (float64, so counts and losses add exactly enough)."""
    if d.world == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=d.device if d.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()
