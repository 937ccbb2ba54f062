"""The paged KV cache on the device: one pool of token slots per layer, read through block tables.

Slot `block_id * block_size + offset` holds the K/V of one token. Before each model call the
runner tells the cache where the call's rows stand (`prepare`): their positions and masks, the
slots the new tokens go to and the block tables the rows read through. The model then talks to
it through the cache interface (`model/cache.py`): `attend` stores the new K/V and hands the
pool to the attention op with a `SlotMap`, so a backend's kernel reads the blocks in place
(plain torch gathers them). Lengths live in the scheduler's sequences, so `end` has nothing to do.
"""

from __future__ import annotations

import torch

from ..model.cache import SlotMap


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, n_kv: int, head_dim: int,
                 dtype: torch.dtype, device="cpu"):
        shape = (num_layers, num_blocks * block_size, n_kv, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        # the prepared call (see `prepare`)
        self.positions = self.masks = self.write_slots = self.write_rows = self.slot_map = None

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, n_kv: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * n_kv * head_dim * dtype.itemsize

    def prepare(self, positions: torch.Tensor, masks: list, write_slots: torch.Tensor, write_rows: torch.Tensor,
                read_slots: torch.Tensor, block_tables: torch.Tensor) -> None:
        """The next call's rows: positions (B, T) and a mask per layer; write_slots (N,): slots for
        the N real new tokens; write_rows (N,): their index in the flattened (B*T) input;
        read_slots (B, S): the slots each row attends to, in position order; block_tables
        (B, blocks): the blocks read_slots come from."""
        _, slots, n_kv, D = self.k.shape
        last = positions[:, -1].contiguous()  # a one-token call writes there
        self.slot_map = SlotMap(self.k, self.v, slots * n_kv * D, 0, D, n_kv * D, last, read_slots.shape[1],
                                tables=block_tables.contiguous(), block_size=self.block_size, read_slots=read_slots)
        self.positions, self.masks, self.write_slots, self.write_rows = positions, masks, write_slots, write_rows

    def begin(self, attention_mask, T: int):
        if attention_mask is not None:
            raise ValueError("a paged cache takes positions and masks from the runner, not an attention_mask")
        return self.positions, self.masks

    def attend(self, layer: int, q, k, v, mask, sdpa) -> torch.Tensor:
        self._store(layer, k, v)
        return sdpa.paged(q, self.k[layer], self.v[layer], self.slot_map, mask)

    def end(self, T: int) -> None:
        pass

    def trim(self, n: int) -> None:
        pass  # the next call's positions come from the scheduler, which frees what it no longer counts

    def expect_trim(self, n: int) -> None:
        pass

    def trim_window(self) -> int:
        return 0

    def slots(self) -> SlotMap:
        return self.slot_map

    def _store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        B, n_kv, T, D = k.shape
        for pool, new in ((self.k[layer], k), (self.v[layer], v)):
            flat = new.transpose(1, 2).reshape(B * T, n_kv, D)  # (B*T, n_kv, D)
            pool.index_copy_(0, self.write_slots, flat.index_select(0, self.write_rows))
