"""The block manager: the paged KV cache's bookkeeping, in plain Python (no torch).

The cache is `num_blocks` blocks of `block_size` token slots. A sequence owns the blocks of its
block table; blocks are reference-counted so sequences can share a prefix. A full block whose
K/V has been computed is hashed by its whole token prefix (the hash chains the previous block's
hash with its own tokens; the first block's chain starts from the sequence's `cache_salt`, its
LoRA adapter) and stays findable after its sequence ends, until the block is handed
out again: a later request with the same prefix reuses it instead of recomputing it.

Free blocks wait in least-recently-freed order, so the prefix cache evicts the oldest first.

Speculative decoding takes slots for a step's guesses beyond the sequence's tokens
(`append_slots(seq, extra)`) and gives back, once they are judged, the blocks only rejected
guesses reached (`trim_slots`). Only tokens of the sequence are ever hashed (`register_computed`
reads `token_ids` up to `num_computed_tokens`), so a rejected guess is never findable.
"""

from __future__ import annotations

from collections import OrderedDict

from .sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] = ()


def block_hash(prev_hash: int | None, token_ids) -> int:
    return hash((prev_hash, tuple(token_ids)))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one slot, got {num_blocks} x {block_size}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.prefix_queried_tokens = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hit_tokens = 0  # of those, found

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix cache -------------------------------------------------------------------------

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids holding the K/V of seq's leading full blocks. The last token is never taken
        from the cache: its logits are needed, so at least one token is always computed."""
        if not self.enable_prefix_caching:
            return []
        hits, prev = [], seq.cache_salt
        for i in range((len(seq) - 1) // self.block_size):
            tokens = tuple(seq.block_tokens(i, self.block_size))
            prev = block_hash(prev, tokens)
            block_id = self.hash_to_block.get(prev)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            hits.append(block_id)
        return hits

    def register_computed(self, seq: Sequence) -> None:
        """Hash seq's full blocks whose K/V is now computed, making them findable."""
        if not self.enable_prefix_caching:
            return
        done = min(seq.num_computed_tokens, len(seq)) // self.block_size
        for i in range(seq.num_hashed_blocks, done):
            block = self.blocks[seq.block_table[i]]
            prev = self.blocks[seq.block_table[i - 1]].hash if i else seq.cache_salt
            tokens = tuple(seq.block_tokens(i, self.block_size))
            block.hash, block.token_ids = block_hash(prev, tokens), tokens
            self.hash_to_block.setdefault(block.hash, block.block_id)
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, done)

    # -- allocation ---------------------------------------------------------------------------

    def can_allocate(self, seq: Sequence) -> bool:
        hits = self._cached_prefix(seq)
        idle_hits = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        return self.blocks_for(len(seq)) - len(hits) + idle_hits <= len(self.free)

    def allocate(self, seq: Sequence) -> None:
        """Give a new sequence blocks for all its tokens, reusing cached prefix blocks."""
        assert not seq.block_table, f"{seq} already holds blocks"
        hits = self._cached_prefix(seq)
        for block_id in hits:
            self._take(block_id)
        seq.block_table = list(hits)
        seq.num_hashed_blocks = len(hits)
        seq.num_computed_tokens = len(hits) * self.block_size
        if not seq.num_preemptions:  # a recomputed sequence keeps what its first admission found
            seq.num_cached_tokens = seq.num_computed_tokens
        self.prefix_queried_tokens += len(seq)
        self.prefix_hit_tokens += seq.num_cached_tokens
        self.append_slots(seq)

    def can_append(self, seq: Sequence, extra: int = 0) -> bool:
        return self.blocks_for(len(seq) + extra) - len(seq.block_table) <= len(self.free)

    def append_slots(self, seq: Sequence, extra: int = 0) -> None:
        """Grow seq's block table to cover all its tokens and `extra` slots after them."""
        while len(seq.block_table) < self.blocks_for(len(seq) + extra):
            block_id = next(iter(self.free))
            self._take(block_id)
            self._forget(block_id)
            seq.block_table.append(block_id)

    def trim_slots(self, seq: Sequence) -> None:
        """Return the blocks past seq's tokens (those only rejected guesses reached) to the pool."""
        while len(seq.block_table) > self.blocks_for(len(seq)):
            block_id = seq.block_table.pop()
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._forget(block_id)  # it held guesses, never a hashed prefix: reuse it first
                self.free[block_id] = None
                self.free.move_to_end(block_id, last=False)

    def free_seq(self, seq: Sequence) -> None:
        # Last block first, so a prefix outlives its continuations in the eviction order.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_hashed_blocks = 0

    def take_copies(self) -> list[tuple[int, int]]:
        """State slots to copy (from, to) before the next step: none without recurrent state."""
        return []

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1

    def _forget(self, block_id: int) -> None:
        """A block handed out for new tokens loses its old identity in the prefix cache."""
        block = self.blocks[block_id]
        if block.hash is not None and self.hash_to_block.get(block.hash) == block_id:
            del self.hash_to_block[block.hash]
        block.hash, block.token_ids = None, ()


class StateBlockManager(BlockManager):
    """A hybrid model's bookkeeping: blocks for its attention layers' K/V and, per sequence, one of
    `num_slots` recurrent-state slots, taken with the first blocks and returned with the last (a
    preempted sequence loses its slot). A waiting sequence is admitted only when a slot is free.

    Prefix cache: a cached block of K/V is of no use without the recurrent state after it, so a
    hybrid's prefix hits end at a *snapshot*: the state copied aside each time a sequence's
    computed tokens reach a multiple of `snapshot_interval` (a multiple of block_size; the
    scheduler ends prefill chunks there, where a call leaves the state). Snapshots take
    `num_snapshots` more slots (ids from num_slots on), each keyed by the hash of the block it
    ends, the least recently used replaced first. The copies are decided here and made by the
    runner before the next step's calls (`take_copies`), in order: nothing changes a slot
    between two steps, so a save still finds its sequence's state, and a restore runs after the
    save it may read. Without snapshots there is no prefix cache."""

    def __init__(self, num_blocks: int, block_size: int, num_slots: int, num_snapshots: int = 0,
                 snapshot_interval: int | None = None):
        super().__init__(num_blocks, block_size, enable_prefix_caching=num_snapshots > 0)
        if num_slots < 1:
            raise ValueError(f"need at least one state slot, got {num_slots}")
        self.snapshot_interval = snapshot_interval or block_size
        if self.snapshot_interval % block_size:
            raise ValueError(f"the state snapshot interval ({self.snapshot_interval}) must be a multiple of the "
                             f"block size ({block_size})")
        self.num_slots = num_slots
        self.free_slots: list[int] = list(range(num_slots - 1, -1, -1))  # popped from the end: slot 0 first
        # snapshot slot -> hash of the block it ends (None: empty), least recently used first
        self.snapshots: OrderedDict[int, int | None] = OrderedDict.fromkeys(range(num_slots, num_slots + num_snapshots))
        self.snapshot_of: dict[int, int] = {}  # block hash -> its snapshot slot
        self.copies: list[tuple[int, int]] = []  # (from slot, to slot), for the runner, in order

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks up to the last one that ends at a snapshot."""
        hits = super()._cached_prefix(seq)
        per = self.snapshot_interval // self.block_size
        for n in range(len(hits) // per * per, 0, -per):
            if self.blocks[hits[n - 1]].hash in self.snapshot_of:
                return hits[:n]
        return []

    def can_allocate(self, seq: Sequence) -> bool:
        return bool(self.free_slots) and super().can_allocate(seq)

    def allocate(self, seq: Sequence) -> None:
        assert seq.state_slot is None, f"{seq} already holds state slot {seq.state_slot}"
        super().allocate(seq)
        seq.state_slot = self.free_slots.pop()
        if seq.num_computed_tokens:  # a prefix hit: its state starts as the snapshot's
            last = self.blocks[seq.block_table[seq.num_computed_tokens // self.block_size - 1]]
            snapshot = self.snapshot_of[last.hash]
            self.snapshots.move_to_end(snapshot)
            self.copies.append((snapshot, seq.state_slot))

    def register_computed(self, seq: Sequence) -> None:
        """Hash seq's computed blocks; keep its state aside when they end on the snapshot grid."""
        super().register_computed(seq)
        n = seq.num_computed_tokens
        if not self.snapshots or n == 0 or n % self.snapshot_interval or n // self.block_size > seq.num_hashed_blocks:
            return
        key = self.blocks[seq.block_table[n // self.block_size - 1]].hash
        if key in self.snapshot_of:
            self.snapshots.move_to_end(self.snapshot_of[key])
            return
        snapshot, old = next(iter(self.snapshots.items()))
        if old is not None:
            del self.snapshot_of[old]
        self.snapshots[snapshot] = key
        self.snapshots.move_to_end(snapshot)
        self.snapshot_of[key] = snapshot
        self.copies.append((seq.state_slot, snapshot))

    def take_copies(self) -> list[tuple[int, int]]:
        copies, self.copies = self.copies, []
        return copies

    def free_seq(self, seq: Sequence) -> None:
        if seq.state_slot is not None:
            self.free_slots.append(seq.state_slot)
            seq.state_slot = None
        super().free_seq(seq)
