"""The engine's request histograms, fed a request's life at known times: each interval lands in
the bucket its length says, and an aborted request is counted but not timed."""

from __future__ import annotations

from qwenkit.engine.sampling_params import SamplingParams
from qwenkit.engine.sequence import Sequence, Status
from qwenkit.engine.stats import EngineStats, Histogram, one_two_five


def live_request(stats: EngineStats, prompt_len: int, token_times: list[float], reason: str) -> Sequence:
    """A request that arrives at 10.0, is admitted at 10.5 and again (a second chunk) at 11.0,
    gets a token at each of `token_times` and finishes with `reason` 0.25 s after the last."""
    seq = Sequence(list(range(prompt_len)), SamplingParams(max_tokens=8), arrival_time=10.0)
    stats.on_add(seq)
    stats.on_step([seq], 10.5)
    stats.on_step([seq], 11.0)
    for t in token_times:
        seq.token_ids.append(1)
        stats.on_token(seq, t)
    seq.status, seq.finish_reason = Status.FINISHED, reason
    stats.on_finish(seq, token_times[-1] + 0.25)
    return seq


def observed(stats: EngineStats, name: str) -> tuple[int, float]:
    _, cumulative, total = stats.snapshot()[name]
    return cumulative[-1], total


def test_intervals_of_a_finished_request():
    stats = EngineStats(max_model_len=64)
    live_request(stats, 3, [12.0, 12.25, 12.75], "length")
    expected = {"time_to_first_token": (1, 2.0), "inter_token_latency": (2, 0.75), "e2e_request_latency": (1, 3.0),
                "request_queue_time": (1, 0.5), "request_prefill_time": (1, 1.5), "request_decode_time": (1, 0.75),
                "request_inference_time": (1, 2.25), "request_prompt_tokens": (1, 3), "request_generation_tokens": (1, 3)}
    assert {name: observed(stats, name) for name in expected} == expected  # quarter seconds: exact in binary
    bounds, cumulative, _ = stats.snapshot()["time_to_first_token"]
    assert cumulative[bounds.index(1.0)] == 0 and cumulative[bounds.index(2.5)] == 1  # 2.0 s sits in le=2.5
    values = stats.values()
    assert values["prompt_tokens"] == 3 and values["generation_tokens"] == 3 and values["steps"] == 2
    assert (values["finished"], values["finished_length"], values["aborted"]) == (1, 1, 0)


def test_an_aborted_request_is_counted_not_timed():
    stats = EngineStats(max_model_len=64)
    live_request(stats, 5, [12.0, 13.0], "abort")
    assert observed(stats, "time_to_first_token") == (1, 2.0)  # the tokens it did get still count
    assert observed(stats, "inter_token_latency") == (1, 1.0)
    assert observed(stats, "e2e_request_latency") == (0, 0.0) and observed(stats, "request_queue_time") == (0, 0.0)
    assert (stats.values()["finished"], stats.values()["aborted"], stats.values()["finished_abort"]) == (1, 1, 1)


def test_histogram_buckets_hold_values_up_to_their_bound():
    h = Histogram((1, 2, 5))
    for v in (0.5, 1, 1.5, 2, 7):
        h.observe(v)
    assert h.snapshot() == ((1, 2, 5), [2, 4, 4, 5], 12.0)
    assert one_two_five(2048) == (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)
