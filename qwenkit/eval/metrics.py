"""Scores shared by the benchmarks."""

from __future__ import annotations

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c pass (Chen et al. 2021):
    1 - C(n-c, k) / C(n, k), computed as a product so large n does not overflow."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(counts: list[tuple[int, int]], k: int) -> float | None:
    """Mean pass@k in percent over tasks given (n, c) per task; None when some task has n < k."""
    if not counts or any(n < k for n, _ in counts):
        return None
    return 100.0 * sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)
