"""The timed operations, identical for every runner: prefill/TTFT, batch-1 and batch-8 decode."""

from __future__ import annotations

import random
import statistics
import time


def prompts(n: int, length: int, seed: int = 0, vocab_size: int = 151_936) -> list[list[int]]:
    """Deterministic pseudo-text: ordinary vocabulary ids (1000-30000 when the vocabulary has
    them, below the special tokens), different per row."""
    rng = random.Random(seed)
    lo, hi = (1000, 30000) if vocab_size > 30000 else (0, vocab_size)
    return [[rng.randrange(lo, hi) for _ in range(length)] for _ in range(n)]


def _prefill_seconds(runner, rows, extra) -> tuple[float, list[int]]:
    t0 = time.perf_counter()
    first = runner.prefill(rows, extra)
    return time.perf_counter() - t0, first


def _decode_seconds(runner, rows, new: int) -> tuple[float, list[int]]:
    _, tokens = _prefill_seconds(runner, rows, new + 1)
    produced = [tokens[0]]
    t0 = time.perf_counter()
    for _ in range(new):
        tokens = runner.step(tokens)
        produced.append(tokens[0])
    return time.perf_counter() - t0, produced


def time_config(runner, spec: dict) -> dict:
    L, new, repeats, batch = spec["prompt_len"], spec["new_tokens"], spec["repeats"], spec["batch"]
    vocab = spec.get("vocab_size", 151_936)
    one, many = prompts(1, L, vocab_size=vocab), prompts(batch, L, seed=1, vocab_size=vocab)
    _prefill_seconds(runner, one, new + 1)  # warm-up (allocations, kernel selection)
    prefill = [_prefill_seconds(runner, one, new + 1)[0] for _ in range(repeats)]
    decode1 = [_decode_seconds(runner, one, new) for _ in range(repeats)]
    decode8 = [_decode_seconds(runner, many, new)[0] for _ in range(max(1, repeats - 1))]
    t_prefill = statistics.median(prefill)
    return {
        "prefill_tok_s": L / t_prefill,
        "ttft_s": t_prefill,
        "decode_b1_tok_s": new / statistics.median(t for t, _ in decode1),
        f"decode_b{batch}_tok_s": batch * new / statistics.median(decode8),
        "greedy_tokens": decode1[0][1][:16],
        "samples": {"prefill_s": prefill, "decode_b1_s": [t for t, _ in decode1], "decode_bN_s": decode8},
    }
