"""The one-token step on static buffers: fixed shapes, no host syncs, no data-dependent Python.

What CUDA graphs need: every input in a buffer that never moves (token ids, positions, write
slots, block tables), every shape fixed (a batch padded up to one of a set of sizes; attention
over the cache's whole length under a mask made on the device), and nothing that asks the host
mid-step (RoPE's cos/sin are looked up in a table made once, not computed from positions).

- `GraphedDecode` is the decode step `generate` and the bench ask for (`backends.decode_step`):
  a one-token call on a static `KVCache` runs on buffers of its own, one graph per cache; any
  other call (prefill, an attention mask, the engine's pool) goes to the model as before.
- `PagedDecode` is the engine runner's decode call on the paged pool: rows padded to the next
  batch size (padding rows write to and read from a scratch block no sequence owns), one graph
  per size, captured when the runner is built.

On CUDA the calls are captured (`cuda_graphs.StaticCall`); on a CPU the same steps run eagerly,
which is how the tests prove they give the tokens of the dynamic path.
"""

from __future__ import annotations

import weakref

import torch

from ..model.cache import SlotMap
from ..model.layers import SparseMoE
from ..model.masks import slot_masks
from .cuda_graphs import BATCH_SIZES, StaticCall


def static_ok(model) -> bool:
    """Whether the model's step can run on static buffers: not with dynamic RoPE (it rescales with
    the length) nor for hybrid models (their recurrent state is a cache of another kind)."""
    return model.rope.kind != "dynamic" and not model.config.is_hybrid


def capturable(model) -> bool:
    """Whether to record CUDA graphs: a CUDA model without MoE layers (their routing asks the host)."""
    return model.device.type == "cuda" and not any(isinstance(m, SparseMoE) for m in model.modules())


class RopeTable:
    """cos/sin (n, 1, D) for positions [0, n), made once on the model's device."""

    def __init__(self, model, n: int):
        positions = torch.arange(n, device=model.device)[None]  # (1, n)
        cos, sin = model.rope.cos_sin(positions, torch.float32)  # (1, n, 1, D)
        self.cos, self.sin, self.n = cos[0], sin[0], n

    def __call__(self, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions].to(dtype), self.sin[positions].to(dtype)  # (B, T, 1, D)


def one_token(model, rope: RopeTable, ids, positions, masks, cache) -> torch.Tensor:
    """Next-token logits (B, V) of the model for ids (B, 1) at positions (B, 1): the model's
    forward with RoPE looked up instead of computed."""
    x = model.model.embed_tokens(ids)  # (B, 1, H)
    cos, sin = rope(positions, x.dtype)
    x = model.run_layers(x, cos, sin, masks, cache)
    return model.finish(x, cache, 1, 1)[:, -1]  # (B, V)


class _StepCache:
    """The cache interface for one static step: `attend` writes the new K/V through index
    tensors held in buffers; the model's forward is all that calls it."""

    def begin(self, attention_mask, T: int):
        raise ValueError("a static step's cache is driven by its step, not by a forward's begin")

    def end(self, T: int) -> None:
        pass  # the step's owner advances the real cache

    def trim(self, n: int) -> None:
        raise ValueError("a static step's cache holds one call; trim the cache it writes into")

    def expect_trim(self, n: int) -> None:
        if n:
            self.trim(n)

    def trim_window(self) -> int:
        return 0


class DenseStepCache(_StepCache):
    """Over a static KVCache's storage k, v (layers, B, n_kv, L, D): the token goes to slot `at`."""

    def __init__(self, k, v, at):
        self.k, self.v, self.at = k, v, at

    def attend(self, layer, q, k, v, mask, sdpa):
        self.k[layer].index_copy_(2, self.at, k)  # k (B, n_kv, 1, D) into (B, n_kv, L, D)
        self.v[layer].index_copy_(2, self.at, v)
        return sdpa(q, self.k[layer], self.v[layer], mask)

    def slots(self) -> SlotMap:
        _, B, n_kv, L, D = self.k.shape
        return SlotMap(self.k, self.v, B * n_kv * L * D, n_kv * L * D, L * D, D, self.at.expand(B), L)


class PagedStepCache(_StepCache):
    """Over the engine's pool (layers, slots, n_kv, D) for b rows: token i goes to write[i]; rows
    read through `slot_map` (tables, and the gathered slots when the attention op gathers)."""

    def __init__(self, k, v, write, slot_map):
        self.k, self.v, self.write, self.slot_map = k, v, write, slot_map

    def attend(self, layer, q, k, v, mask, sdpa):
        self.k[layer].index_copy_(0, self.write, k[:, :, 0])  # (b, n_kv, D)
        self.v[layer].index_copy_(0, self.write, v[:, :, 0])
        return sdpa.paged(q, self.k[layer], self.v[layer], self.slot_map, mask)

    def slots(self) -> SlotMap:
        return self.slot_map


class _DenseStep:
    """One static cache's decode: buffers of its batch, one graph."""

    def __init__(self, model, rope: RopeTable, k, v, length: int, capture: bool):
        B, L = k.shape[1], k.shape[3]
        self.model, self.rope, self.batch, self.max_len = model, rope, B, L
        self.ids = torch.zeros(B, 1, dtype=torch.long, device=k.device)
        # the capture's runs write slot `length`, which the first real step then writes again
        self.positions = torch.full((B, 1), length, dtype=torch.long, device=k.device)
        self.cache = DenseStepCache(k, v, self.positions[0])
        self.call = StaticCall(self._run, (B,), capture, name="static-cache decode")

    def _run(self, b: int) -> torch.Tensor:
        masks = slot_masks(self.positions, self.max_len, self.model.windows)  # (B, 1, 1, L) per layer
        return one_token(self.model, self.rope, self.ids, self.positions, masks, self.cache)

    def __call__(self, input_ids, length: int) -> torch.Tensor:
        self.ids.copy_(input_ids)
        self.positions.fill_(length)
        return self.call(self.batch)


class GraphedDecode:
    """`decode_step(model)` under the cuda-graphs backend (module docstring)."""

    def __init__(self, model, capture: bool):
        self.model, self.capture = model, capture and capturable(model)
        self.rope: RopeTable | None = None
        self._steps: "weakref.WeakKeyDictionary[object, _DenseStep]" = weakref.WeakKeyDictionary()

    def __call__(self, input_ids, attention_mask=None, *, cache=None, logits_to_keep: int = 0):
        if cache is None or attention_mask is not None or input_ids.shape[1] != 1 or not static_ok(self.model):
            return self.model(input_ids, attention_mask, cache=cache, logits_to_keep=logits_to_keep)
        slots = cache.slots()
        if slots.tables is not None or slots.k.shape[1] != input_ids.shape[0]:
            return self.model(input_ids, attention_mask, cache=cache, logits_to_keep=logits_to_keep)
        length, max_len = slots.read_len - 1, slots.k.shape[3]
        if length >= max_len:
            raise ValueError(f"KV cache holds {max_len} tokens; {length + 1} needed")
        logits = self._step(cache, slots)(input_ids, length)
        cache.end(1)
        return logits[:, None]  # (B, 1, V), as the model returns it

    @property
    def capture_s(self) -> float:
        """Seconds spent recording graphs, over every static cache this step has run."""
        return sum(step.call.capture_s for step in self._steps.values())

    def verify(self, input_ids, *, cache):
        """A speculative verify call (many tokens a row): the model's forward."""
        return self.model(input_ids, cache=cache)

    def _step(self, cache, slots) -> _DenseStep:
        step = self._steps.get(cache)
        if step is None:
            k, v, length = slots.k, slots.v, slots.read_len - 1
            k[:, :, :, length:].zero_()  # never-written slots are read (masked): no NaN garbage
            v[:, :, :, length:].zero_()
            if self.rope is None or self.rope.n < k.shape[3]:
                self.rope = RopeTable(self.model, k.shape[3])
            step = self._steps[cache] = _DenseStep(self.model, self.rope, k, v, length, self.capture)
        return step


class PagedDecode:
    """The engine runner's decode call over the pool (module docstring). `in_place`: the
    model's attention op reads the pool through the tables itself (no gathered slots, no mask)."""

    def __init__(self, model, pool_k, pool_v, block_size: int, scratch_block: int, max_blocks: int,
                 in_place: bool, capture: bool, sizes=BATCH_SIZES):
        B, dev = max(sizes), pool_k.device
        self.model, self.block_size, self.in_place = model, block_size, in_place
        self.k, self.v = pool_k, pool_v
        self.scratch = scratch_block
        self.rope = RopeTable(model, min(model.config.context_length, max_blocks * block_size))
        self.ids = torch.zeros(B, 1, dtype=torch.long, device=dev)
        self.positions = torch.zeros(B, 1, dtype=torch.long, device=dev)
        self.write = torch.full((B,), scratch_block * block_size, dtype=torch.long, device=dev)
        self.tables = torch.full((B, max_blocks), scratch_block, dtype=torch.long, device=dev)
        self._last_tables: list[list[int]] = []
        self.call = StaticCall(self._run, sizes, capture and capturable(model), name="paged decode")

    def padded(self, n: int) -> int | None:
        return self.call.padded(n)

    def _run(self, b: int) -> torch.Tensor:
        positions, tables = self.positions[:b], self.tables[:b]
        bs, S = self.block_size, tables.shape[1] * self.block_size
        read_slots, masks = None, [None] * len(self.model.windows)
        if not self.in_place:  # the plain op gathers each row's slots under a causal / window mask
            j = torch.arange(S, device=tables.device)
            read_slots = tables[:, j // bs] * bs + j % bs  # (b, S)
            masks = slot_masks(positions, S, self.model.windows)
        n_kv, D = self.k.shape[2:]
        slot_map = SlotMap(self.k, self.v, self.k[0].numel(), 0, D, n_kv * D, positions[:, 0], S,
                           tables=tables, block_size=bs, read_slots=read_slots)
        cache = PagedStepCache(self.k, self.v, self.write[:b], slot_map)
        return one_token(self.model, self.rope, self.ids[:b], positions, masks, cache)

    def __call__(self, tokens: list[int], positions: list[int], tables: list[list[int]]) -> torch.Tensor:
        """Logits (n, V) for n rows (n <= the largest size): each row's token at its position,
        its blocks in its table. Valid until the next call."""
        n, b, bs = len(tokens), self.padded(len(tokens)), self.block_size
        pad = b - n
        slots = [t[p // bs] * bs + p % bs for t, p in zip(tables, positions)] + [self.scratch * bs] * pad
        host = torch.tensor([tokens + [0] * pad, positions + [0] * pad, slots], dtype=torch.long)  # (3, b)
        dev = self.ids.device
        host = host.to(dev, non_blocking=True)
        self.ids[:b, 0].copy_(host[0])
        self.positions[:b, 0].copy_(host[1])
        self.write[:b].copy_(host[2])
        self._upload_tables(tables)
        return self.call(b)[:n]

    def _upload_tables(self, tables: list[list[int]]) -> None:
        """Copy the rows whose table changed since the last call (a long context's tables are
        large; a step changes few). Columns past a row's length may keep older valid ids."""
        for i, table in enumerate(tables):
            if i >= len(self._last_tables) or self._last_tables[i] != table:
                row = torch.tensor(table, dtype=torch.long)
                self.tables[i, :len(table)].copy_(row.to(self.tables.device, non_blocking=True))
        self._last_tables = [list(t) for t in tables]  # copies: the block manager grows its lists in place
