"""The engine's cache for hybrid models: the paged K/V of the attention layers beside a pool of
recurrent-state slots for the Gated DeltaNet layers.

Each running sequence owns one slot (`Sequence.state_slot`, handed out by `StateBlockManager`
with its blocks and returned with them). A slot holds, per DeltaNet layer, the convolution's
last K-1 inputs (model dtype) and the delta-rule state (float32). Before each call the runner
names the rows' slots (`prepare_states`); `read_state` gathers them, `write_state` keeps the new
states aside and `end` scatters them back: a call that fails midway leaves every slot as it was,
so the engine may rerun its chunks one by one. Rows that start their sequence (position 0) get
their slot zeroed first: a slot comes back from its last owner as it was left.

Speculative decoding: before a verify call the runner says how many of each row's tokens it may
take back (`expect_trim`); the DeltaNet layers then hand the states after each of the call's last
w + 1 tokens, `end` holds them, and `trim_rows` puts in each row's slot the state after the
tokens that row kept.

The prefix cache's snapshots are slots too, past the running sequences' (`StateBlockManager`
decides which; `copy_slots` copies a sequence's slot to a snapshot and back).
"""

from __future__ import annotations

import torch

from ..model.cache import StateRollbackError
from .kv_cache import PagedKVCache


def state_shapes(cfg) -> tuple[tuple[int, int], tuple[int, int, int]]:
    """Per DeltaNet layer and slot: the conv inputs (C, K-1) and the delta-rule state (heads, d_k, d_v)."""
    conv_dim = 2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim + cfg.linear_num_value_heads * cfg.linear_value_head_dim
    return (conv_dim, cfg.linear_conv_kernel_dim - 1), (cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                                                         cfg.linear_value_head_dim)


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def bytes_per_slot(cfg, dtype: torch.dtype) -> int:
    """What one sequence's recurrent state takes over all DeltaNet layers."""
    (c, k), (h, dk, dv) = state_shapes(cfg)
    n_linear = cfg.num_hidden_layers - len(cfg.attention_layers)
    return n_linear * (c * k * dtype.itemsize + h * dk * dv * state_dtype(dtype).itemsize)


class PagedStateCache:
    """`PagedKVCache` over the attention layers + `num_slots` recurrent-state slots."""

    def __init__(self, cfg, num_blocks: int, block_size: int, n_kv: int, head_dim: int, num_slots: int,
                 dtype: torch.dtype, device="cpu"):
        self.kv = PagedKVCache(len(cfg.attention_layers), num_blocks, block_size, n_kv, head_dim, dtype, device)
        self.kv_index = {layer: i for i, layer in enumerate(cfg.attention_layers)}
        linear = [i for i in range(cfg.num_hidden_layers) if cfg.is_linear_layer(i)]
        self.state_index = {layer: i for i, layer in enumerate(linear)}
        (c, k), state = state_shapes(cfg)
        self.conv = torch.zeros(len(linear), num_slots, c, k, dtype=dtype, device=device)
        self.state = torch.zeros(len(linear), num_slots, *state, dtype=state_dtype(dtype), device=device)
        self.rows: torch.Tensor | None = None  # (B,) the call's slots
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.keep = 0  # expect_trim's n
        self.window = 0  # the current (or just ended) call's trim window
        self.trail: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # a windowed call's states, held

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes + self.conv.nbytes + self.state.nbytes

    @property
    def block_size(self) -> int:
        return self.kv.block_size

    def prepare(self, *args) -> None:
        """The call's attention rows: as `PagedKVCache.prepare`."""
        self.kv.prepare(*args)

    def prepare_states(self, slots: list[int], fresh: list[bool]) -> None:
        """The call's rows use these slots; `fresh` rows start their sequence (zero state)."""
        device = self.conv.device
        self.rows = torch.tensor(slots, dtype=torch.long, device=device)
        zero = [s for s, f in zip(slots, fresh) if f]
        if zero:
            zero = torch.tensor(zero, dtype=torch.long, device=device)
            self.conv.index_fill_(1, zero, 0)
            self.state.index_fill_(1, zero, 0)
        self.pending = {}

    def copy_slots(self, copies: list[tuple[int, int]]) -> None:
        """Copy whole slots, (from, to) pairs in order: state snapshots kept and restored."""
        for src, dst in copies:
            self.conv[:, dst] = self.conv[:, src]
            self.state[:, dst] = self.state[:, src]

    def begin(self, attention_mask, T: int):
        self.window = min(self.keep, T - 1)
        return self.kv.begin(attention_mask, T)

    def attend(self, layer: int, q, k, v, mask, sdpa) -> torch.Tensor:
        return self.kv.attend(self.kv_index[layer], q, k, v, mask, sdpa)

    def read_state(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = self.state_index[layer]
        return self.conv[i].index_select(0, self.rows), self.state[i].index_select(0, self.rows)  # (B, ..)

    def write_state(self, layer: int, conv: torch.Tensor, state: torch.Tensor) -> None:
        self.pending[self.state_index[layer]] = (conv, state)

    def end(self, T: int) -> None:
        """Scatter the call's new states into its rows' slots; after a call with a trim window, hold
        them (the states after each of its last w + 1 tokens) until `trim_rows` says which to keep."""
        if self.window:
            self.trail, self.pending = self.pending, {}
            return
        self._scatter(self.pending)

    def trim_rows(self, ns: list[int]) -> None:
        """After a call with a trim window w: row b forgets its last ns[b] <= w tokens (a verify
        call's rejected guesses), so its slot gets the state after all but them."""
        w = self.window
        pick = torch.tensor([w - n for n in ns], dtype=torch.long, device=self.conv.device)  # (B,)
        rows = torch.arange(len(ns), device=self.conv.device)
        self._scatter({i: (conv[rows, pick], state[rows, pick]) for i, (conv, state) in self.trail.items()})
        self.trail, self.window = {}, 0

    def _scatter(self, states: dict) -> None:
        for i, (conv, state) in states.items():
            self.conv[i].index_copy_(0, self.rows, conv.to(self.conv.dtype))
            self.state[i].index_copy_(0, self.rows, state.to(self.state.dtype))
        self.pending = {}

    def trim(self, n: int) -> None:
        if n:
            raise StateRollbackError("the engine's state slots forget tokens per row (`trim_rows`)")

    def expect_trim(self, n: int) -> None:
        """From the next call on, `trim_rows` may take back up to each row's last n tokens."""
        self.keep = n

    def trim_window(self) -> int:
        return self.window

    def slots(self):
        raise NotImplementedError("no kernel walks a hybrid cache's storage")
