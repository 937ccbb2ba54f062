"""The engine's counters and request histograms, for /metrics (plain Python, no torch).

The engine stamps each Sequence as it goes (arrival, first scheduled, first token, latest token)
and reports here: every step, every sampled token and every finished request. Token gaps and
time to first token are observed as tokens come; a request's other intervals when it stops or
reaches its length (aborted requests are only counted, so a client that hangs up early does
not make the latencies look fast). Bucket bounds are vLLM's, so dashboards built for vLLM read
ours unchanged.

Speculative decoding counts drafts (steps where a request carried guesses), guessed tokens,
kept ones, and kept ones by position in the draft (vLLM's spec_decode counters).

Reading from another thread (the server's /metrics) is safe: `snapshot()` copies the counts.
"""

from __future__ import annotations

import itertools
from bisect import bisect_left

from .sampling_params import MAX_SPECULATIVE_TOKENS
from .sequence import Sequence

TTFT_BOUNDS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TOKEN_GAP_BOUNDS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0)
REQUEST_BOUNDS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                  240.0, 480.0, 960.0, 1920.0, 7680.0)
FINISH_REASONS = ("stop", "length", "abort")


def one_two_five(limit: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... while <= limit: the bounds of token-count histograms."""
    steps = (m * 10**e for e in itertools.count() for m in (1, 2, 5))
    return tuple(itertools.takewhile(lambda b: b <= limit, steps))


class Histogram:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # per bucket (value <= bound); the last is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def snapshot(self) -> tuple[tuple, list[int], float]:
        """(bounds, cumulative counts with +Inf last, sum); the last count is the total."""
        return self.bounds, list(itertools.accumulate(list(self.counts))), self.sum


class EngineStats:
    def __init__(self, max_model_len: int):
        tokens = one_two_five(max_model_len)
        self.counters = dict(requests=0, prompt_tokens=0, generation_tokens=0, steps=0, spec_drafts=0,
                             spec_draft_tokens=0, spec_accepted_tokens=0)
        self.accepted_per_pos = [0] * MAX_SPECULATIVE_TOKENS  # kept guesses by their place in the draft
        self.longest_draft = 0
        self.finished_by_reason = dict.fromkeys(FINISH_REASONS, 0)
        self.histograms = {
            "time_to_first_token": Histogram(TTFT_BOUNDS), "inter_token_latency": Histogram(TOKEN_GAP_BOUNDS),
            **{k: Histogram(REQUEST_BOUNDS) for k in ("e2e_request_latency", "request_queue_time",
                                                     "request_prefill_time", "request_decode_time",
                                                     "request_inference_time")},
            "request_prompt_tokens": Histogram(tokens), "request_generation_tokens": Histogram(tokens)}

    def on_add(self, seq: Sequence) -> None:
        self.counters["requests"] += 1

    def on_step(self, seqs, now: float) -> None:
        self.counters["steps"] += 1
        for seq in seqs:
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now

    def on_token(self, seq: Sequence, now: float) -> None:
        self.counters["generation_tokens"] += 1
        if seq.first_token_time is None:  # prefill done: vLLM counts prompt tokens here too
            seq.first_token_time = now
            self.counters["prompt_tokens"] += seq.num_prompt_tokens
            self.histograms["time_to_first_token"].observe(now - seq.arrival_time)
        else:
            self.histograms["inter_token_latency"].observe(now - seq.last_token_time)
        seq.last_token_time = now

    def on_draft(self, num_draft: int, accepted: int) -> None:
        """A drafted step: how many guesses it carried, and how many of them the target kept."""
        self.counters["spec_drafts"] += 1
        self.counters["spec_draft_tokens"] += num_draft
        self.counters["spec_accepted_tokens"] += accepted
        for i in range(accepted):
            self.accepted_per_pos[i] += 1
        self.longest_draft = max(self.longest_draft, num_draft)

    def on_finish(self, seq: Sequence, now: float) -> None:
        self.finished_by_reason[seq.finish_reason] += 1
        if seq.finish_reason == "abort":
            return
        h, scheduled = self.histograms, seq.first_scheduled_time
        first, last = seq.first_token_time, seq.last_token_time  # a finished request has a token
        h["e2e_request_latency"].observe(now - seq.arrival_time)
        h["request_queue_time"].observe(scheduled - seq.arrival_time)
        h["request_prefill_time"].observe(first - scheduled)
        h["request_decode_time"].observe(last - first)
        h["request_inference_time"].observe(last - scheduled)
        h["request_prompt_tokens"].observe(seq.num_prompt_tokens)
        h["request_generation_tokens"].observe(seq.num_output_tokens)

    def values(self) -> dict[str, float]:
        by_reason = dict(self.finished_by_reason)
        return {**self.counters, "finished": sum(by_reason.values()), "aborted": by_reason["abort"],
                **{f"finished_{r}": n for r, n in by_reason.items()},
                **{f"spec_accepted_pos_{i}": self.accepted_per_pos[i] for i in range(self.longest_draft)}}

    def snapshot(self) -> dict[str, tuple[tuple, list[int], float]]:
        return {name: h.snapshot() for name, h in self.histograms.items()}
