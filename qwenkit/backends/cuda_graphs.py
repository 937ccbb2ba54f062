"""A function over static buffers, one per batch size: replayed from CUDA graphs, or run eagerly.

`StaticCall(fn, sizes, capture)` holds `fn(b) -> tensor`, which reads its inputs from buffers
that never move and returns its output in a tensor of fixed shape for b rows. With `capture`
(a CUDA model) each size's call is recorded once, at construction, into a `torch.cuda.CUDAGraph`
(largest first, one memory pool shared by all), so a step is one replay instead of hundreds of
kernel launches; elsewhere `fn` runs eagerly on the same buffers, which is how the CPU tests run
the very step the GPU replays. A failed capture (an op that syncs with the host, say) leaves the
eager form in place and says why in `failure`.
"""

from __future__ import annotations

import bisect
import logging
import time

import torch

log = logging.getLogger("qwenkit.backends")

BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)  # rows a step is padded up to


class StaticCall:
    def __init__(self, fn, sizes=BATCH_SIZES, capture: bool = False, name: str = "step"):
        self.fn = fn
        self.sizes = tuple(sorted(sizes))
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.capture_s = 0.0
        self.failure: str | None = None
        if capture:
            self._capture_all(name)

    def padded(self, n: int) -> int | None:
        """The batch size n rows run at (the next size in the set), or None when n is past it."""
        i = bisect.bisect_left(self.sizes, n)
        return self.sizes[i] if i < len(self.sizes) else None

    def __call__(self, b: int) -> torch.Tensor:
        """The output for b rows (b one of `sizes`): valid until the next call."""
        graph = self.graphs.get(b)
        if graph is None:
            return self.fn(b)
        graph.replay()
        return self.outputs[b]

    @torch.inference_mode()
    def _capture_all(self, name: str) -> None:
        t0 = time.perf_counter()
        pool = None
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up off the capture: kernel choice, Triton builds, allocator
                for b in self.sizes:
                    self.fn(b)
            torch.cuda.current_stream().wait_stream(side)
            for b in reversed(self.sizes):  # largest first: the smaller graphs reuse its memory
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[b] = self.fn(b)
                pool = graph.pool()
                self.graphs[b] = graph
            torch.cuda.synchronize()
        except RuntimeError as e:  # an op that cannot be captured: run eagerly, say why
            self.graphs.clear()
            self.outputs.clear()
            self.failure = f"{type(e).__name__}: {e}"
            log.warning("%s: CUDA graph capture failed, running eagerly (%s)", name, self.failure)
        self.capture_s = time.perf_counter() - t0
        if self.graphs:
            log.info("%s: %d CUDA graphs captured in %.2f s", name, len(self.graphs), self.capture_s)
