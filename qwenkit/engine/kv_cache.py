"""The paged KV cache on the device: one pool of token slots per layer, read through block tables.

Slot `block_id * block_size + offset` holds the K/V of one token. Each step the runner gives
the cache where the new tokens go (`write_slots`) and which slots each row attends to
(`read_slots`, position order, padded); `update` is what the model's attention calls. That is
the plain-torch path: it gathers each row's K/V into a padded (B, n_kv, S, D) tensor that SDPA
reads with a mask, and runs anywhere torch does. On a CPU in fp32, a decode step's attention
reads the pool in place through the block tables instead (`attend_one`), and the fused decode
step (`model/fused_decode.py`) does the same for whole layers.
"""

from __future__ import annotations

import torch

from ..backends import cpu_kernels


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, n_kv: int, head_dim: int,
                 dtype: torch.dtype, device="cpu"):
        shape = (num_layers, num_blocks * block_size, n_kv, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.length = 0  # the model reads it only when not given positions and a mask
        self.write_slots = self.write_rows = self.read_slots = self.block_tables = None
        self._layout = None  # (positions, cpu_kernels.Layout or None) of this step's block tables

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, n_kv: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * n_kv * head_dim * dtype.itemsize

    def prepare(self, write_slots: torch.Tensor, write_rows: torch.Tensor, read_slots: torch.Tensor,
                block_tables: torch.Tensor | None = None) -> None:
        """write_slots (N,): slots for the N real new tokens; write_rows (N,): their index in the
        flattened (B*T) step input; read_slots (B, S): the slots each row attends to; block_tables
        (B, blocks): the blocks read_slots come from, for readers that walk whole blocks (the
        fused decode step)."""
        self.write_slots, self.write_rows, self.read_slots = write_slots, write_rows, read_slots
        self.block_tables = block_tables
        self._layout = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new k, v (B, n_kv, T, D); return each row's keys/values (B, n_kv, S, D)."""
        self._store(layer, k, v)
        k_all = self.k[layer][self.read_slots]  # (B, S, n_kv, D)
        v_all = self.v[layer][self.read_slots]
        return k_all.transpose(1, 2), v_all.transpose(1, 2)

    def attend_one(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   mask: torch.Tensor | None) -> torch.Tensor | None:
        """Decode attention without the gathered copy `update` makes: store the new k, v
        (B, n_kv, 1, D) and return (B, H, 1, D) for q read straight from the pool through the block
        tables (`cpu_kernels.attend_paged`: fp32 on a CPU with the kernels built). None where that
        does not apply; the caller then uses `update`."""
        if self.block_tables is None or mask is None or k.shape[2] != 1 or not cpu_kernels.fp32_inference(q, self.k):
            return None
        S = mask.shape[-1]
        if self._layout is None or self._layout[0] != S:  # checked once a step, not once a layer
            self._layout = S, cpu_kernels.paged_layout(self.block_tables, self.block_size, self.k, S)
        if self._layout[1] is None or self.block_tables.shape[0] != q.shape[0]:
            return None
        self._store(layer, k, v)  # if the kernel still declines, update stores the same values again
        return cpu_kernels.attend_paged(q, self.k[layer], self.v[layer], self._layout[1], mask)

    def _store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        B, n_kv, T, D = k.shape
        for pool, new in ((self.k[layer], k), (self.v[layer], v)):
            flat = new.transpose(1, 2).reshape(B * T, n_kv, D)  # (B*T, n_kv, D)
            pool.index_copy_(0, self.write_slots, flat.index_select(0, self.write_rows))

    def advance(self, n: int) -> None:
        pass
