"""The one interface between the model and whatever holds its past: `Cache`, and the static cache.

The model never asks what kind of cache it has. In one forward call it asks the cache, in order:

1. `begin(attention_mask, T)` -> (positions (B, T), one mask per layer): where the call's T new
   tokens sit and what each of them may attend to (None: plain causal over the call alone).
2. `attend(layer, q, k, v, mask, sdpa)` once per layer: store the new k, v and return the
   attention of q over every slot the rows see. `sdpa` is the model's attention op (an `SDPA`
   module, or the one a backend installed): the cache hands it its storage in the form it
   keeps, dense slices (`sdpa(q, k, v, mask)`) or a paged pool (`sdpa.paged(q, k, v, slots, mask)`).
3. `end(T)`: the call is over; its tokens now belong to the cache.

`trim(n)` forgets the last n tokens stored (a speculative step's rejected proposals). A caller
that will trim says so first: after `expect_trim(n)`, up to the last n tokens fed may be taken
back (until it says another n).

A hybrid model's recurrent (Gated DeltaNet) layers call no `attend`: they ask `read_state(layer)`
for their rows' states and hand the new ones to `write_state(layer, conv, state)`. A state
cannot be stepped back, so a recurrent layer asks `trim_window()` first: when it is w > 0 it
hands the states after each of the call's last w + 1 tokens, stacked, which the cache keeps for
`trim`. A cache that can forget without help (K/V slots are only overwritten) says 0 and
ignores `expect_trim`.

Kernels that walk the storage themselves (the fused decode step) ask `slots()`: a `SlotMap`
saying where each row's positions live. Implementations: `KVCache` here (one preallocated
buffer a batch: `generate`, `bench`), `HybridCache` here (a hybrid model's batch: a `KVCache` for
its attention layers and the recurrent states of the others), `engine.kv_cache.PagedKVCache`
(the engine's pool of blocks) and `engine.state_cache.PagedStateCache` (that pool over a hybrid
model's attention layers, beside per-sequence recurrent-state slots).
"""

from __future__ import annotations

from collections import deque
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

    def expect_trim(self, n: int) -> None:
        """From the next call on (until said again), a `trim` may take back up to the last n
        tokens fed: keep what that needs."""

    def trim_window(self) -> int:
        """During a call of T tokens: w > 0 when the recurrent layers are to hand their states after
        each of its last w + 1 tokens (min(n, T - 1) after `expect_trim(n)`), else 0."""

    def slots(self) -> SlotMap:
        """Where this call's rows read and write, for kernels that walk the storage."""

    def read_state(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A recurrent layer's state for the call's rows: (the convolution's last inputs
        (B, C, K-1), the delta-rule state (B, heads, d_k, d_v) float32). Hybrid caches only."""

    def write_state(self, layer: int, conv: torch.Tensor, state: torch.Tensor) -> None:
        """Replace a recurrent layer's state by the one after this call's tokens; when
        `trim_window()` is w > 0, the states after each of its last w + 1 tokens, stacked on dim 1:
        conv (B, w+1, C, K-1), state (B, w+1, heads, d_k, d_v), the last the state after the call."""


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

    def expect_trim(self, n: int) -> None:
        pass  # a slot stays as written until a later call overwrites it

    def trim_window(self) -> int:
        return 0

    def slots(self) -> SlotMap:
        _, B, n_kv, L, D = self.k.shape
        write_at = torch.full((B,), self.length, dtype=torch.int64)
        return SlotMap(self.k, self.v, B * n_kv * L * D, n_kv * L * D, L * D, D, write_at, self.length + 1)


class HybridCache:
    """A hybrid model's past for a batch: a `KVCache` over its attention layers, and per recurrent
    layer the rows' convolution inputs (B, C, K-1) in the model dtype and delta-rule states
    (B, heads, d_k, d_v) in float32 (accumulated in float32 under bf16 weights), in `conv[i]`
    and `state[i]` for the i-th recurrent layer.

    Rollback: after `expect_trim(n)` the recurrent layers hand their states after each token of
    the calls that follow (the last n + 1 of a longer call), and `history[i]` keeps the latest
    n + 1 of them, across calls: `trim(m)` for m up to n (and the tokens fed since) puts back the
    state after all but the last m. States are replaced, never written into, so keeping one is
    keeping a reference. Any other `trim(m > 0)` raises `StateRollbackError`."""

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
        self.keep = 0  # expect_trim's n
        self.window = 0  # this call's trim_window
        self.history = [deque(maxlen=1) for _ in self.index]  # per layer: (conv, state) after each latest token
        self.held = 0  # tokens trim may take back now

    @property
    def length(self) -> int:
        return self.kv.length

    @property
    def max_len(self) -> int:
        return self.kv.max_len

    def begin(self, attention_mask, T: int):
        self.window = min(self.keep, T - 1)
        return self.kv.begin(attention_mask, T)

    def attend(self, layer: int, q, k, v, mask, sdpa) -> torch.Tensor:
        return self.kv.attend(layer, q, k, v, mask, sdpa)

    def read_state(self, layer: int):
        i = self.index[layer]
        return self.conv[i], self.state[i]

    def write_state(self, layer: int, conv, state) -> None:
        i = self.index[layer]
        steps = [(conv[:, j], state[:, j]) for j in range(conv.shape[1])] if self.window else [(conv, state)]
        self.conv[i], self.state[i] = steps[-1]
        if self.keep:
            self.history[i].extend(steps)  # a longer call's first tokens are past keeping: maxlen drops the rest

    def end(self, T: int) -> None:
        self.kv.end(T)
        self.held = min(self.held + T, self.keep)
        self.window = 0

    def expect_trim(self, n: int) -> None:
        if n < 0:
            raise ValueError(f"cannot expect to forget {n} tokens")
        self.held = min(self.held, n) if self.keep else 0
        self.keep = n  # the history ends with the current state, after the tokens trim may take back
        self.history = [deque(list(h)[-self.held - 1:] if self.held else [(c, s)], maxlen=n + 1)
                        for h, c, s in zip(self.history, self.conv, self.state)]

    def trim_window(self) -> int:
        return self.window

    def trim(self, n: int) -> None:
        if not n:
            return
        if n > self.held:
            raise StateRollbackError(f"a hybrid model's recurrent state cannot forget {n} tokens: states are "
                                     f"kept for the last {self.held} (`expect_trim` says how many to keep)")
        self.kv.trim(n)
        for i, h in enumerate(self.history):
            for _ in range(n):
                h.pop()
            self.conv[i], self.state[i] = h[-1]
        self.held -= n

    def slots(self) -> SlotMap:
        raise NotImplementedError("no kernel walks a hybrid cache's storage")
