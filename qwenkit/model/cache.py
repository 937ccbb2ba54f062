"""The one interface between the model and whatever holds its past: `Cache`, and the static cache.

The model never asks what kind of cache it has. In one forward call it asks the cache, in order:

1. `begin(attention_mask, T)` -> (positions (B, T), one mask per layer): where the call's T new
   tokens sit and what each of them may attend to (None: plain causal over the call alone).
2. `attend(layer, q, k, v, mask, sdpa)` once per layer: store the new k, v and return the
   attention of q over every slot the rows see. `sdpa` is the model's attention op (an `SDPA`
   module, or the one a backend installed): the cache hands it its storage in the form it
   keeps, dense slices (`sdpa(q, k, v, mask)`) or a paged pool (`sdpa.paged(q, k, v, slots, mask)`).
3. `end(T)`: the call is over; its tokens now belong to the cache.

`trim(n)` forgets the last n tokens stored (a speculative step's rejected proposals).

A hybrid model's recurrent (Gated DeltaNet) layers call no `attend`: they ask `read_state(layer)`
for their rows' states and hand the new ones to `write_state(layer, conv, state)`.

Kernels that walk the storage themselves (the fused decode step) ask `slots()`: a `SlotMap`
saying where each row's positions live. Implementations: `KVCache` here (one preallocated
buffer a batch: `generate`, `bench`), `HybridCache` here (a hybrid model's batch: a `KVCache` for
its attention layers and the recurrent states of the others), `engine.kv_cache.PagedKVCache`
(the engine's pool of blocks) and `engine.state_cache.PagedStateCache` (that pool over a hybrid
model's attention layers, beside per-sequence recurrent-state slots).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..config import ConfigError  # the model core imports only the model and its config
from .masks import layer_masks, positions_of


class StateRollbackError(ConfigError, NotImplementedError):
    """A cache asked to forget tokens it cannot (a recurrent state without snapshots)."""


@dataclass
class SlotMap:
    """Where row b keeps the key (or value) of position j, counted in elements from one layer's
    base of `k` / `v` (layer l's base is l * layer_stride):

    - no tables (a static cache): b * sb + h * sh + j * ss for K/V head h;
    - tables (B, n_blocks) int64 (a paged pool): (tables[b, j // block_size] * block_size
      + j % block_size) * ss + h * sh.

    This call's token of row b is written at position `write_at[b]`; rows read positions
    [0, read_len) under the call's mask. `read_slots` (B, read_len), when given, are the pool
    slots themselves (for readers that gather). `derived` keeps what a backend computes from the
    map once per call (a kernel's view of it), so the layers of one call share it.
    """

    k: torch.Tensor
    v: torch.Tensor
    layer_stride: int
    sb: int
    sh: int
    ss: int
    write_at: torch.Tensor  # (B,) int64
    read_len: int
    tables: torch.Tensor | None = None
    block_size: int = 1
    read_slots: torch.Tensor | None = None
    derived: dict = field(default_factory=dict)


class Cache(Protocol):
    def begin(self, attention_mask: torch.Tensor | None, T: int) -> tuple[torch.Tensor, list]:
        """Positions (B, T) of the call's tokens and a mask per layer (bool (B|1, 1, T, S) or None)."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, sdpa) -> torch.Tensor:
        """Store k, v (B, n_kv, T, D); return the attention (B, H, T, D) of q (B, H, T, D)."""

    def end(self, T: int) -> None:
        """The call's T tokens are stored for good."""

    def trim(self, n: int) -> None:
        """Forget the last n tokens stored: the next call writes where they were."""

    def slots(self) -> SlotMap:
        """Where this call's rows read and write, for kernels that walk the storage."""

    def read_state(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A recurrent layer's state for the call's rows: (the convolution's last inputs
        (B, C, K-1), the delta-rule state (B, heads, d_k, d_v) float32). Hybrid caches only."""

    def write_state(self, layer: int, conv: torch.Tensor, state: torch.Tensor) -> None:
        """Replace a recurrent layer's state by the one after this call's tokens."""


class KVCache:
    """A preallocated cache for a batch: k and v of shape (layers, B, n_kv, max_len, D); `length`
    slots are written. Row b's slot j holds its j-th token, padding included (left padding is
    masked by `begin` through the attention mask). `layers`: the model layers that store K/V
    (default all), kept in that order."""

    def __init__(self, cfg, batch: int, max_len: int, dtype: torch.dtype, device="cpu", layers=None):
        layers = range(cfg.num_hidden_layers) if layers is None else layers
        self.index = {layer: i for i, layer in enumerate(layers)}
        shape = (len(self.index), batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0
        self.windows = [cfg.window_of(i) for i in range(cfg.num_hidden_layers)]
        self.linear = [cfg.is_linear_layer(i) for i in range(cfg.num_hidden_layers)]

    def begin(self, attention_mask, T: int):
        if self.length + T > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; {self.length + T} needed")
        device = self.k.device
        return (positions_of(attention_mask, self.length, T, device),
                layer_masks(attention_mask, self.length, T, self.windows, self.linear, device))

    def attend(self, layer: int, q, k, v, mask, sdpa) -> torch.Tensor:
        layer = self.index[layer]
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return sdpa(q, self.k[layer, :, :, :end], self.v[layer, :, :, :end], mask)  # views: no copy

    def end(self, T: int) -> None:
        self.length += T

    def trim(self, n: int) -> None:
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot forget {n} of the {self.length} tokens the KV cache holds")
        self.length -= n

    def slots(self) -> SlotMap:
        _, B, n_kv, L, D = self.k.shape
        write_at = torch.full((B,), self.length, dtype=torch.int64)
        return SlotMap(self.k, self.v, B * n_kv * L * D, n_kv * L * D, L * D, D, write_at, self.length + 1)


class HybridCache:
    """A hybrid model's past for a batch: a `KVCache` over its attention layers, and per recurrent
    layer the rows' convolution inputs (B, C, K-1) in the model dtype and delta-rule states
    (B, heads, d_k, d_v) in float32 (accumulated in float32 under bf16 weights), in `conv[i]`
    and `state[i]` for the i-th recurrent layer.

    A recurrent state cannot step back: `trim(n > 0)` raises `StateRollbackError` (a
    NotImplementedError and a ConfigError: speculative rollback would need a snapshot of the
    state per proposed token; none is kept)."""

    def __init__(self, cfg, batch: int, max_len: int, dtype: torch.dtype, device="cpu"):
        self.kv = KVCache(cfg, batch, max_len, dtype, device, layers=cfg.attention_layers)
        linear = [i for i in range(cfg.num_hidden_layers) if cfg.is_linear_layer(i)]
        self.index = {layer: i for i, layer in enumerate(linear)}
        conv_dim = 2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim + cfg.linear_num_value_heads * cfg.linear_value_head_dim
        state_dtype = torch.promote_types(dtype, torch.float32)
        # One tensor per layer, replaced (not copied into) by write_state.
        self.conv = [torch.zeros(batch, conv_dim, cfg.linear_conv_kernel_dim - 1, dtype=dtype, device=device)
                     for _ in self.index]
        self.state = [torch.zeros(batch, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                                  cfg.linear_value_head_dim, dtype=state_dtype, device=device) for _ in self.index]

    @property
    def length(self) -> int:
        return self.kv.length

    @property
    def max_len(self) -> int:
        return self.kv.max_len

    def begin(self, attention_mask, T: int):
        return self.kv.begin(attention_mask, T)

    def attend(self, layer: int, q, k, v, mask, sdpa) -> torch.Tensor:
        return self.kv.attend(layer, q, k, v, mask, sdpa)

    def read_state(self, layer: int):
        i = self.index[layer]
        return self.conv[i], self.state[i]

    def write_state(self, layer: int, conv, state) -> None:
        i = self.index[layer]
        self.conv[i], self.state[i] = conv, state

    def end(self, T: int) -> None:
        self.kv.end(T)

    def trim(self, n: int) -> None:
        if n:
            raise StateRollbackError("a hybrid model's recurrent state cannot forget tokens (no snapshots are "
                                     "kept), so speculative decoding does not run on it yet")

    def slots(self) -> SlotMap:
        raise NotImplementedError("no kernel walks a hybrid cache's storage")
