"""The batching engine on hybrid models (Gated DeltaNet + attention): every request's greedy output
equals `qwenkit.generate` on it alone, whatever it was batched with, chunked, preempted or started
from a prefix-cache hit (a state snapshot); the recurrent-state slots and snapshots are taken and
returned with the sequence and paid for in the memory budget; `qwenkit serve` answers a chat
request on a tiny hybrid checkpoint and counts its prefix hits in /metrics."""

from __future__ import annotations

import re

import httpx
import pytest
import torch

import qwenkit
from hybrid_tiny import make_hybrid
from qwenkit.analysis import state_bytes_per_sequence
from qwenkit.engine import Engine, EngineSettings, SamplingParams
from qwenkit.engine.block_manager import StateBlockManager
from qwenkit.engine.kv_cache import PagedKVCache
from qwenkit.engine.memory import plan_num_blocks, state_bytes
from qwenkit.engine.scheduler import Chunk
from qwenkit.engine.sequence import Sequence
from qwenkit.errors import ConfigError
from test_engine import random_prompts, run_staggered

GREEDY = SamplingParams(temperature=0, max_tokens=10)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """Qwen3-Next layout: DeltaNet, attention, DeltaNet, attention; MoE and dense MLPs."""
    m = qwenkit.load_model(make_hybrid(tmp_path_factory.mktemp("next") / "ckpt", "qwen3_next"), dtype=torch.float32)
    m.eos_token_ids = []
    return m


def test_staggered_mixed_lengths_chunked_and_preempted_equal_generate(model):
    system = random_prompts(1, 12, 13, 256, seed=7)[0]
    prompts = random_prompts(6, 1, 30, 256, seed=1) + random_prompts(3, 1, 10, 256, seed=2, prefix=system)
    prompts.insert(2, random_prompts(1, 45, 46, 256, seed=3)[0])  # three prefill chunks of at most 16
    refs = [qwenkit.generate(model, p, GREEDY.max_tokens) for p in prompts]
    settings = EngineSettings(block_size=4, num_blocks=16, max_prefill_tokens=16, max_num_seqs=4,
                              enable_prefix_caching=False)
    engine = Engine(model, settings)
    got = run_staggered(engine, prompts, GREEDY, arrive_every=1)
    assert [got[str(i)] for i in range(len(prompts))] == refs
    m = engine.metrics()
    assert m["preemptions"] > 0  # a preempted sequence recomputed its state from the start
    assert m["prefix_cache_hit_tokens"] == 0  # the shared system prompt was computed, not reused
    assert m["kv_blocks_free"] == m["kv_blocks_total"]
    assert sorted(engine.blocks.free_slots) == list(range(4))
    assert engine.runner.cache.conv.shape[1] == 4  # no snapshot slots without a prefix cache


def test_prefix_hits_start_from_a_state_snapshot_and_equal_generate(model):
    """Requests sharing a 20-token system prompt: snapshots every 8 tokens, so later ones start at
    token 16 from the state kept there, and decode past further grid points; preempted ones find
    their own snapshots again."""
    system = random_prompts(1, 20, 21, 256, seed=7)[0]
    prompts = random_prompts(7, 1, 14, 256, seed=2, prefix=system) + random_prompts(3, 5, 30, 256, seed=4)
    refs = [qwenkit.generate(model, p, 12) for p in prompts]
    settings = EngineSettings(block_size=4, num_blocks=16, max_prefill_tokens=16, max_num_seqs=4,
                              state_snapshot_interval=8, max_state_snapshots=6)
    engine = Engine(model, settings)
    got = run_staggered(engine, prompts, SamplingParams(temperature=0, max_tokens=12), arrive_every=2)
    assert [got[str(i)] for i in range(len(prompts))] == refs
    m = engine.metrics()
    assert m["prefix_cache_hit_tokens"] >= 16 * 5  # most requests with the system prompt started at 16
    assert m["prefix_cache_hit_tokens"] % 8 == 0  # hits end on the snapshot grid
    assert m["preemptions"] > 0
    assert sorted(engine.blocks.free_slots) == list(range(4)) and engine.blocks.copies == []


def test_prefill_chunks_end_on_the_snapshot_grid(model):
    engine = Engine(model, EngineSettings(block_size=4, num_blocks=32, max_prefill_tokens=64, max_num_seqs=2,
                                          state_snapshot_interval=16))
    engine.add_request(list(range(1, 41)), GREEDY)
    sizes = []
    while engine.scheduler.running == [] or engine.scheduler.running[0].num_computed_tokens < 40:
        sizes.append(engine.scheduler.schedule()[0].num_tokens)
        engine.scheduler.postprocess([Chunk(engine.scheduler.running[0], sum(sizes[:-1]), sizes[-1])], [None])
    assert sizes == [16, 16, 8]


def test_continuing_chunks_are_never_left_padded(model):
    """Padding decays a carried state, so only rows that start their sequence share a padded call."""
    engine = Engine(model, EngineSettings(block_size=4, num_blocks=64, max_num_seqs=8))
    seqs = [Sequence(list(range(40)), GREEDY) for _ in range(5)]
    chunks = [Chunk(seqs[0], 0, 9), Chunk(seqs[1], 8, 5), Chunk(seqs[2], 0, 3), Chunk(seqs[3], 16, 9),
              Chunk(seqs[4], 4, 5), Chunk(seqs[0], 30, 1)]
    calls = engine.runner.groups(chunks)
    assert sorted(calls) == [[0, 2, 3], [1, 4], [5]]
    for call in calls:
        T = max(chunks[i].num_tokens for i in call)
        assert all(chunks[i].num_tokens == T or chunks[i].start == 0 for i in call)


def test_continuing_rows_of_different_lengths_in_one_step_equal_generate(model):
    """Two prompts prefilled in chunks that end apart, so one step holds continuing chunks of
    several lengths (each must run unpadded) beside decode rows."""
    prompts = [random_prompts(1, n, n + 1, 256, seed=n)[0] for n in (23, 37, 30)]
    refs = [qwenkit.generate(model, p, GREEDY.max_tokens) for p in prompts]
    engine = Engine(model, EngineSettings(block_size=8, num_blocks=40, max_prefill_tokens=12, max_num_seqs=3))
    got = run_staggered(engine, prompts, GREEDY, arrive_every=1)
    assert [got[str(i)] for i in range(3)] == refs


def test_state_slots_bound_admission_and_come_back():
    blocks = StateBlockManager(num_blocks=16, block_size=4, num_slots=2)
    a, b, c = (Sequence([1, 2, 3], GREEDY) for _ in range(3))
    blocks.allocate(a)
    blocks.allocate(b)
    assert {a.state_slot, b.state_slot} == {0, 1}
    assert not blocks.can_allocate(c)  # blocks are free, slots are not
    blocks.free_seq(a)
    assert a.state_slot is None and blocks.can_allocate(c)
    blocks.allocate(c)
    assert c.state_slot in (0, 1) and c.state_slot != b.state_slot
    assert not blocks.enable_prefix_caching


def _computed(blocks: StateBlockManager, seq: Sequence, n: int) -> None:
    seq.num_computed_tokens = n
    blocks.register_computed(seq)


def test_snapshots_are_kept_on_the_grid_found_by_prefix_and_replaced_least_recently_used():
    blocks = StateBlockManager(num_blocks=32, block_size=4, num_slots=2, num_snapshots=2, snapshot_interval=8)
    a = Sequence(list(range(30)), GREEDY)
    blocks.allocate(a)
    for n in (4, 8, 12, 16, 20):
        _computed(blocks, a, n)
    assert blocks.take_copies() == [(a.state_slot, 2), (a.state_slot, 3)]  # after tokens 8 and 16 only
    b = Sequence(list(range(18)) + [99, 98], GREEDY)  # shares 18 tokens: hits end at the snapshot at 16
    blocks.allocate(b)
    assert b.num_computed_tokens == b.num_cached_tokens == 16
    assert blocks.take_copies() == [(3, b.state_slot)]
    c = Sequence(list(range(5)) + [7] * 20, GREEDY)  # shares one block, no snapshot before it: no hit
    blocks.free_seq(a)
    blocks.allocate(c)
    assert c.num_computed_tokens == 0 and blocks.take_copies() == []
    _computed(blocks, c, 8)  # a new snapshot replaces the least recently used one (slot 2; 3 was just read)
    assert blocks.take_copies() == [(c.state_slot, 2)]
    d = Sequence(list(range(12)), GREEDY)
    blocks.allocate(d) if blocks.free_slots else None
    blocks.free_seq(b)
    blocks.allocate(d)
    assert d.num_computed_tokens == 0  # its snapshot at 8 was replaced

def test_memory_budget_pays_for_state_slots(model):
    cfg = model.config
    per_block = PagedKVCache.bytes_per_block(len(cfg.attention_layers), 4, cfg.num_key_value_heads, cfg.head_dim,
                                             torch.float32)
    settings = EngineSettings(block_size=4, max_num_seqs=3, max_state_snapshots=2)
    states = state_bytes(model, settings)
    # per slot: 2 DeltaNet layers x (conv of 2 x 8 + 2 x 8 + 4 x 12 channels x 3 inputs + state 4 heads x 8 x 12);
    # a slot for each of 3 running sequences and 2 prefix-cache snapshots
    assert states == 5 * 2 * (80 * 3 + 4 * 8 * 12) * 4 == 5 * state_bytes_per_sequence(cfg, 4)
    assert state_bytes(model, EngineSettings(max_num_seqs=3)) == 6 * state_bytes_per_sequence(cfg, 4)
    assert state_bytes(model, EngineSettings(max_num_seqs=3, enable_prefix_caching=False)) == states * 3 // 5
    budget = EngineSettings(block_size=4, max_num_seqs=3, max_state_snapshots=2, kv_cache_memory=states + 10 * per_block)
    assert plan_num_blocks(model, budget, 2048) == 10
    engine = Engine(model, budget)
    assert engine.runner.cache.nbytes == states + 10 * per_block
    with pytest.raises(ConfigError, match="5 recurrent-state slots"):
        plan_num_blocks(model, EngineSettings(max_num_seqs=3, max_state_snapshots=2, kv_cache_memory=states), 2048)


@pytest.mark.parametrize("settings, what", [(EngineSettings(deterministic=True), "deterministic mode"),
                                            (EngineSettings(max_loras=1), "LoRA adapters")])
def test_unsupported_combinations_are_refused_by_name(model, settings, what):
    with pytest.raises(ConfigError, match=f"does not run {what}.*hybrid models \\(qwen3_next\\)"):
        Engine(model, settings)
    with pytest.raises(ConfigError, match="state_snapshot_interval \\(100\\) must be a multiple of block_size \\(16\\)"):
        Engine(model, EngineSettings(state_snapshot_interval=100))


def test_tensor_parallelism_refuses_a_hybrid_by_name(model):
    from qwenkit.engine.tensor_parallel import shard_model

    with pytest.raises(ConfigError, match="tensor parallelism does not split hybrid models \\(qwen3_next"):
        shard_model(model, 0, 2)


def test_serve_answers_a_chat_on_a_hybrid_checkpoint_and_counts_prefix_hits(tmp_path):
    openai = pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    from test_server import VOCAB, write_tokenizer
    from test_server_cli import free_port, served_process

    ckpt = make_hybrid(tmp_path / "tiny-next", "qwen3_5_text", vocab_size=VOCAB)
    write_tokenizer(ckpt)
    tokenizer = qwenkit.load_tokenizer(ckpt)
    reference = qwenkit.load_model(ckpt, dtype=torch.float32)
    system = {"role": "system", "content": "You answer briefly. " * 6}
    chats = [[system, {"role": "user", "content": text}] for text in ("Hello there", "Hi again")]
    prompts = [tokenizer.apply_chat_template(messages, tokenize=True) for messages in chats]
    expected = [tokenizer.decode(qwenkit.generate(reference, p, 8), skip_special_tokens=True) for p in prompts]
    port = free_port()
    with served_process(ckpt, port, "--kv-cache-memory", "1MiB", "--max-num-seqs", "4", "--block-size", "4",
                        "--state-snapshot-interval", "16"):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        replies = [client.chat.completions.create(model="tiny-next", messages=m, max_tokens=8, temperature=0)
                   for m in chats]
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert [r.choices[0].message.content for r in replies] == expected
    r = replies[0]
    assert r.usage.prompt_tokens == len(prompts[0]) and r.usage.completion_tokens <= 8
    shared = next(i for i, (a, b) in enumerate(zip(*prompts)) if a != b) // 16 * 16  # the second's hit
    assert shared > 0
    hits = float(re.search(r"^vllm:prefix_cache_hits_total(?:{[^}]*})? (\S+)", metrics, re.M).group(1))
    rate = float(re.search(r"^qwenkit_prefix_cache_hit_rate (\S+)", metrics, re.M).group(1))
    assert hits == shared and rate == pytest.approx(shared / sum(map(len, prompts)), abs=1e-6)


def test_n_choices_on_a_hybrid_share_the_prompt_through_its_snapshot(model):
    """Samples of one prompt (`after=`): the followers wait for the leader's prompt, start from the
    state snapshot at its last grid point and sample exactly what each draws alone."""
    from qwenkit.server.choices import choice_seed

    prompt = random_prompts(1, 21, 22, 256, seed=11)[0]
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=5)
    settings = EngineSettings(block_size=4, num_blocks=40, max_prefill_tokens=8, state_snapshot_interval=8)
    engine = Engine(model, settings)
    first = engine.add_request(prompt, params)
    ids = [first] + [engine.add_request(prompt, params.replace(seed=choice_seed(5, k)), after=first) for k in (1, 2)]
    out = {i: [] for i in ids}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id] += o.token_ids
    assert engine.metrics()["prefix_cache_hit_tokens"] == 2 * 16  # each follower started at 16
    for k, rid in enumerate(ids):
        alone = Engine(model, settings)
        alone.add_request(prompt, params.replace(seed=choice_seed(5, k)), request_id="x")
        got = []
        while alone.has_unfinished():
            got += [t for o in alone.step() for t in o.token_ids]
        assert out[rid] == got
    assert len({tuple(v) for v in out.values()}) > 1
