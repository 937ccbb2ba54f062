"""Physical bounds measured in the same run as the models: memory read bandwidth and bf16 GEMM peak.

Every timing is taken warm (one untimed call first), on a GPU too, where a first call includes
the library's start-up.

Decode at small batch is bound by reading the weights (bytes per token / bandwidth); prefill by
matrix-multiply throughput (FLOPs per token / GEMM peak). Both are measured, never assumed.
"""

from __future__ import annotations

import statistics
import time

import torch


def _timed(fn, device: torch.device) -> float:
    """Seconds for one call, waiting for the device to finish (CUDA runs asynchronously)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def _median_time(fn, repeats: int, device: torch.device) -> float:
    _timed(fn, device)  # warm-up
    return statistics.median(_timed(fn, device) for _ in range(repeats))


def read_bandwidth(gib: float = 1.0, repeats: int = 7, device="cpu") -> float:
    """Bytes per second for summing a buffer far larger than the caches (all threads)."""
    device = torch.device(device)
    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32, device=device)
    seconds = _median_time(lambda: x.sum(), repeats, device)
    return x.numel() * 4 / seconds


def gemm_peak(n: int = 2048, dtype=torch.bfloat16, repeats: int = 5, budget_s: float = 0.2, device="cpu") -> float:
    """FLOP/s of a square matrix multiply in `dtype`, n at most `n`: the size doubles from 256
    while one multiply takes under `budget_s` (a dtype without a native kernel stays small)."""
    device = torch.device(device)
    size = min(256, n)
    while size < n:
        a = torch.randn(size, size, device=device).to(dtype)
        # warm first: a cold call pays for library start-up and kernel choice, which stopped the
        # search at 256 on an H200 (1.1 TFLOP/s read against ~780 TFLOP/s warm)
        _timed(lambda: a @ a, device)
        if _timed(lambda: a @ a, device) > budget_s / 8:  # the next doubling costs 8x
            break
        size *= 2
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    seconds = _median_time(lambda: a @ b, repeats, device)
    return 2 * size**3 / seconds


def probe(device: str = "cpu") -> dict:
    """The bounds of `device` (a GPU gets a larger buffer and matrices to leave its caches and
    fill its cores); on a CPU n=1024 keeps the probe short where bf16 has no native kernel."""
    big = torch.device(device).type == "cuda"
    gib, n = (4.0, 8192) if big else (1.0, 1024)
    return {"read_GBps": read_bandwidth(gib, device=device) / 1e9, "bf16_gemm_GFLOPs": gemm_peak(n, device=device) / 1e9,
            "fp32_gemm_GFLOPs": gemm_peak(n, torch.float32, device=device) / 1e9, "threads": torch.get_num_threads(),
            "device": device}
