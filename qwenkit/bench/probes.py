"""Physical bounds measured in the same run as the models: memory read bandwidth and bf16 GEMM peak.

Decode at small batch is bound by reading the weights (bytes per token / bandwidth); prefill by
matrix-multiply throughput (FLOPs per token / GEMM peak). Both are measured, never assumed.
"""

from __future__ import annotations

import statistics
import time

import torch


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def read_bandwidth(gib: float = 1.0, repeats: int = 7) -> float:
    """Bytes per second for summing a buffer far larger than the caches (all threads)."""
    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    seconds = _median_time(lambda: x.sum(), repeats)
    return x.numel() * 4 / seconds


def gemm_peak(n: int = 2048, dtype=torch.bfloat16, repeats: int = 5, budget_s: float = 0.2) -> float:
    """FLOP/s of a square matrix multiply in `dtype`, n at most `n`: the size doubles from 256
    while one multiply takes under `budget_s` (a dtype without a native kernel stays small)."""
    size = min(256, n)
    while size < n:
        a = torch.randn(size, size).to(dtype)
        t0 = time.perf_counter()
        a @ a
        if time.perf_counter() - t0 > budget_s / 8:  # the next doubling costs 8x
            break
        size *= 2
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    seconds = _median_time(lambda: a @ b, repeats)
    return 2 * size**3 / seconds


def probe() -> dict:
    # n=1024 keeps the probe short even where bf16 has no native kernel (~1 GFLOP/s there).
    return {"read_GBps": read_bandwidth() / 1e9, "bf16_gemm_GFLOPs": gemm_peak(1024) / 1e9,
            "fp32_gemm_GFLOPs": gemm_peak(1024, torch.float32) / 1e9, "threads": torch.get_num_threads()}
