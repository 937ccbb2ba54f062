"""The block manager alone (no torch): allocation, reference counts, prefix hashing and eviction."""

from qwenkit.engine.block_manager import BlockManager
from qwenkit.engine.sampling_params import SamplingParams
from qwenkit.engine.sequence import Sequence


def seq(tokens) -> Sequence:
    return Sequence(list(tokens), SamplingParams())


def computed(bm: BlockManager, s: Sequence) -> Sequence:
    s.num_computed_tokens = len(s)
    bm.register_computed(s)
    return s


def test_allocate_covers_all_tokens_and_free_returns_blocks():
    bm = BlockManager(8, 4)
    s = seq(range(10))
    bm.allocate(s)
    assert len(s.block_table) == 3 and bm.num_free_blocks == 5
    bm.free_seq(s)
    assert bm.num_free_blocks == 8 and s.block_table == []


def test_prefix_blocks_are_shared_and_refcounted():
    bm = BlockManager(8, 4)
    a = seq(range(10))
    bm.allocate(a)
    computed(bm, a)
    b = seq([*range(8), 99, 98, 97])
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2] and b.num_computed_tokens == 8
    assert bm.blocks[a.block_table[0]].ref_count == 2 and bm.prefix_hit_tokens == 8
    bm.free_seq(a)
    assert bm.blocks[b.block_table[0]].ref_count == 1


def test_blocks_are_hashed_only_once_computed():
    bm = BlockManager(8, 4)
    a = seq(range(12))
    bm.allocate(a)
    a.num_computed_tokens = 5  # a chunked prefill got one block in
    bm.register_computed(a)
    b = seq(range(12))
    bm.allocate(b)
    assert b.num_computed_tokens == 4


def test_last_token_is_always_computed():
    bm = BlockManager(8, 4)
    a = seq(range(8))
    bm.allocate(a)
    computed(bm, a)
    bm.free_seq(a)
    b = seq(range(8))
    bm.allocate(b)
    assert b.num_computed_tokens == 4  # the second block holds the last token: recomputed


def test_freed_prefix_survives_until_its_blocks_are_reused():
    bm = BlockManager(4, 4)
    a = seq(range(8))
    bm.allocate(a)
    computed(bm, a)
    bm.free_seq(a)
    assert bm.num_free_blocks == 4
    again = seq([*range(4), 7, 7, 7, 7, 1])
    assert bm.can_allocate(again)
    bm.allocate(again)
    assert again.num_computed_tokens == 4 and bm.num_free_blocks == 1
    other = seq([50] * 4)  # takes the last free block: the least recently freed one
    bm.allocate(other)
    bm.free_seq(again)
    bm.free_seq(other)
    c = seq(range(9))
    bm.allocate(c)
    assert c.num_computed_tokens == 4  # block 0 still cached; block 1 was handed out and forgotten


def test_can_append_and_append_slots():
    bm = BlockManager(2, 4)
    s = seq(range(4))
    bm.allocate(s)
    s.token_ids.append(5)
    assert bm.can_append(s)
    bm.append_slots(s)
    assert len(s.block_table) == 2 and bm.num_free_blocks == 0
    s.token_ids += [6, 7, 8, 9]
    assert not bm.can_append(s)


def test_prefix_caching_off_never_hits():
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    a = seq(range(9))
    bm.allocate(a)
    computed(bm, a)
    b = seq(range(9))
    bm.allocate(b)
    assert b.num_computed_tokens == 0 and bm.prefix_hit_tokens == 0
