"""The scheduler alone (no torch, no model): chunked prefill, mixed steps, preemption, stops."""

from qwenkit.engine.block_manager import BlockManager
from qwenkit.engine.sampling_params import SamplingParams
from qwenkit.engine.scheduler import Scheduler
from qwenkit.engine.sequence import Sequence, Status


def make(num_blocks=16, block_size=4, max_num_seqs=8, max_prefill_tokens=8, eos=(0,)):
    return Scheduler(BlockManager(num_blocks, block_size), max_num_seqs, max_prefill_tokens, eos, 1000)


def step(s: Scheduler, token: int = 7):
    """One step with a fake model that always samples `token`."""
    chunks = s.schedule()
    s.postprocess(chunks, [token if c.samples else None for c in chunks])
    return [(c.seq.request_id, c.start, c.num_tokens) for c in chunks]


def add(s: Scheduler, n_prompt: int, request_id: str, **params) -> Sequence:
    seq = Sequence(list(range(1, n_prompt + 1)), SamplingParams(**params), request_id)
    s.add(seq)
    return seq


def test_long_prompt_is_prefilled_in_chunks_while_others_decode():
    s = make(max_prefill_tokens=8)
    add(s, 3, "short", max_tokens=10)
    assert step(s) == [("short", 0, 3)]
    add(s, 20, "long", max_tokens=10)
    assert step(s) == [("short", 3, 1), ("long", 0, 8)]
    assert step(s) == [("short", 4, 1), ("long", 8, 8)]
    assert step(s) == [("short", 5, 1), ("long", 16, 4)]
    assert step(s) == [("short", 6, 1), ("long", 20, 1)]


def test_batch_size_limit_keeps_requests_waiting():
    s = make(max_num_seqs=2)
    for i in range(3):
        add(s, 2, str(i), max_tokens=3)
    assert [r for r, _, _ in step(s)] == ["0", "1"]
    assert len(s.waiting) == 1


def test_newest_is_preempted_and_recomputed_when_blocks_run_out():
    s = make(num_blocks=3, block_size=4, max_prefill_tokens=100)
    a = add(s, 4, "a", max_tokens=8)
    b = add(s, 4, "b", max_tokens=8)
    step(s)  # both prefilled, one block each; each sampled token needs a second block
    assert step(s) == [("a", 4, 1)]
    assert b.status == Status.WAITING and b.num_preemptions == 1 and s.num_preemptions == 1
    assert b.token_ids[4:] == [7] and b.block_table == [] and b.num_computed_tokens == 0
    while a.status != Status.FINISHED:
        step(s)
    assert a.num_output_tokens == 8
    while s.has_work():
        step(s)
    assert b.num_output_tokens == 8 and s.blocks.num_free_blocks == 3


def test_stop_reasons_and_blocks_freed():
    s = make()
    a = add(s, 2, "eos", max_tokens=5)
    b = add(s, 2, "len", max_tokens=2)
    c = add(s, 2, "ids", max_tokens=5, stop_token_ids=(9,))
    chunks = s.schedule()
    s.postprocess(chunks, [0, 5, 9])
    step(s)
    assert (a.finish_reason, b.finish_reason, c.finish_reason) == ("stop", "length", "stop")
    assert s.blocks.num_free_blocks == 16 and not s.has_work()


def test_ignore_eos_runs_to_max_tokens():
    s = make()
    a = add(s, 2, "a", max_tokens=3, ignore_eos=True)
    while s.has_work():
        step(s, token=0)
    assert a.output_ids == [0, 0, 0] and a.finish_reason == "length"


def test_finish_while_waiting_or_running():
    s = make(max_num_seqs=1)
    a = add(s, 2, "a")
    b = add(s, 2, "b")
    step(s)
    s.finish(b, "abort")
    s.finish(a, "abort")
    assert not s.has_work() and s.blocks.num_free_blocks == 16
