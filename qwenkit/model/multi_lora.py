"""Several LoRA adapters on one model at once, chosen per batch row (what a server needs).

`AdapterSet(model, max_adapters, max_rank)` holds adapters by name, read from PEFT's layout as
`apply_adapter` reads them, without touching the model's weights. A forward over a batch whose
rows use different adapters (or none) runs inside `adapters.rows(per_row)`:

    with adapters.rows([None, chat, sql, chat]):   # one Adapter or None per batch row
        logits = model(input_ids, cache=cache)

For the length of that block, forward hooks on the adapted projections add each row's own update
to its output: rows are grouped by adapter, so a group costs two thin matmuls over its rows
(x_rows A^T, then B^T, per part of a fused projection) and base rows cost nothing. The result
equals the base model with that row's adapter merged, up to rounding. Outside `rows()` the model
carries no hooks, so its fast paths (the fused decode step) stay as they were.

Each adapter slot reserves `nbytes_for(model, max_rank)` in the engine's memory budget. An
unloaded adapter leaves the name table at once; it lives on (and keeps its slot) while requests
that hold it still run, and frees both when the last of them ends.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import weakref
from pathlib import Path

import torch
from torch import nn

from ..errors import RequestError
from .lora import FUSED, PLAIN, TARGETS, LoRA, adapter_targets, load_peft_tensors, read_adapter, target_parts

_ids = itertools.count(1)


class Adapter:
    """One loaded adapter: {projection name: LoRA}, and an id unique to this load (the prefix
    cache keys K/V computed under an adapter by it, so a reload under the same name never
    reuses stale K/V)."""

    def __init__(self, name: str, path: str, loras: dict[str, LoRA], rank: int):
        self.id, self.name, self.path, self.loras, self.rank = next(_ids), name, path, loras, rank
        self.nbytes = sum(p.nbytes for lora in loras.values() for p in lora.parameters())

    def __repr__(self) -> str:
        return f"Adapter({self.name!r}, rank={self.rank}, {len(self.loras)} projections)"


def projections(model: nn.Module) -> dict[str, nn.Module]:
    """The model's adaptable projections by name (plain, kernel-backed or quantized forms alike)."""
    leaves = set(FUSED) | set(PLAIN)
    return {n: m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in leaves and hasattr(m, "in_features")}


def nbytes_for(model: nn.Module, rank: int) -> int:
    """Bytes of one adapter of rank `rank` on every projection, in the model's dtype."""
    elements = 0
    for name, m in projections(model).items():
        for _, size in target_parts(name, m, model.config, TARGETS).values():
            elements += rank * (m.in_features + size)  # A (r, in) and B (size, r)
    return elements * torch.empty((), dtype=model.dtype).element_size()


class AdapterSet:
    def __init__(self, model: nn.Module, max_adapters: int, max_rank: int):
        self.model, self.max_adapters, self.max_rank = model, max_adapters, max_rank
        self.modules = projections(model)
        self.loaded: dict[str, Adapter] = {}
        self.retiring: weakref.WeakSet[Adapter] = weakref.WeakSet()  # unloaded, still held by requests
        self._groups: list[tuple[Adapter, torch.Tensor]] = []
        self._lock = threading.Lock()  # loads and unloads come from server threads

    @property
    def num_slots_used(self) -> int:
        return len(self.loaded) + len(self.retiring)

    def get(self, name: str) -> Adapter:
        adapter = self.loaded.get(name)
        if adapter is None:
            known = ", ".join(sorted(self.loaded)) or "none"
            raise RequestError(f"no LoRA adapter named {name!r} is loaded (loaded: {known})")
        return adapter

    def load(self, name: str, path: str | Path) -> Adapter:
        """Read an adapter directory and add it under `name` (RequestError: name taken, no free
        slot, rank over max_rank; CheckpointError: the files)."""
        self._check_room(name)
        config, tensors, source = read_adapter(path)
        rank = int(config["r"])
        if rank > self.max_rank:
            raise RequestError(f"adapter {name!r} has rank {rank}; this engine holds ranks up to {self.max_rank}")
        targets = adapter_targets(tensors, source)
        loras = {}
        for module_name, m in self.modules.items():
            parts = target_parts(module_name, m, self.model.config, targets)
            if parts:
                lora = LoRA(m.in_features, parts, m.out_features, rank, float(config["lora_alpha"]), 0.0)
                loras[module_name] = lora.to(device=self.model.device, dtype=self.model.dtype).requires_grad_(False)
        load_peft_tensors(loras, tensors, source)
        adapter = Adapter(name, str(path), loras, rank)
        with self._lock:
            self._check_room(name)
            self.loaded[name] = adapter
        return adapter

    def _check_room(self, name: str) -> None:
        if name in self.loaded:
            raise RequestError(f"a LoRA adapter named {name!r} is already loaded")
        if self.num_slots_used >= self.max_adapters:
            raise RequestError(f"all {self.max_adapters} LoRA adapter slots are taken "
                               f"({len(self.retiring)} by unloaded adapters whose requests still run)")

    def unload(self, name: str) -> Adapter:
        """Take `name` out of the table; requests holding the adapter finish with it."""
        with self._lock:
            adapter = self.get(name)
            del self.loaded[name]
            self.retiring.add(adapter)
        return adapter

    @contextlib.contextmanager
    def rows(self, per_row: list[Adapter | None]):
        """Within this block, row b of the model's calls gets per_row[b]'s update (None: none)."""
        groups: dict[Adapter, list[int]] = {}
        for b, adapter in enumerate(per_row):
            if adapter is not None:
                groups.setdefault(adapter, []).append(b)
        device = self.model.device
        self._groups = [(a, torch.tensor(rows, device=device)) for a, rows in groups.items()]
        names = {n for a in groups for n in a.loras}
        handles = [self.modules[n].register_forward_hook(self._hook(n)) for n in names]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._groups = []

    def _hook(self, name: str):
        def add_updates(_module, args, out):
            for adapter, rows in self._groups:
                lora = adapter.loras.get(name)
                if lora is not None:
                    _add_rows(lora, out, args[0], rows)
            return out
        return add_updates


def _add_rows(lora: LoRA, out: torch.Tensor, x: torch.Tensor, rows: torch.Tensor) -> None:
    """out[rows] += the update of x[rows], part by part (rows index dim 0; in place)."""
    xs = x.index_select(0, rows).to(lora.A[next(iter(lora.parts))].dtype)  # (R, ..., in)
    for part, (start, size) in lora.parts.items():
        low = (xs @ lora.A[part].T) * lora.scale  # (R, ..., r)
        out[..., start:start + size].index_add_(0, rows, (low @ lora.B[part].T).to(out.dtype))  # (R, ..., size)
