"""Decode with torch.compile against qwenkit's own decode paths, one process per path.

    python benchmarks/compile_decode.py fused     # qwenkit as shipped: the C decode step
    python benchmarks/compile_decode.py eager     # torch ops only (run with QWENKIT_CPU_KERNELS=0)
    python benchmarks/compile_decode.py compile   # torch.compile (inductor) of the torch-ops step

fp32, batch 1, a 128-token prompt, then `--steps` greedy tokens; prints the median ms a token,
the compile time (first step, and the recompile when the cache length turns dynamic) and the
first tokens, so the paths can be checked against each other. `compile` and `eager` need
QWENKIT_CPU_KERNELS=0: the C kernels are opaque to the compiler (each call would break the graph).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import qwenkit
from qwenkit.backends import decode_step
from qwenkit.weights.hub import DEFAULT_MODEL


def decode(model, step, prompt: torch.Tensor, steps: int) -> tuple[list[float], list[int]]:
    """Seconds per step and the greedy tokens after `prompt` (1, T)."""
    times, tokens = [], []
    with torch.inference_mode():
        cache = model.new_cache(1, prompt.shape[1] + steps + 1)
        tok = model(prompt, cache=cache)[:, -1].argmax(-1, keepdim=True)
        for _ in range(steps):
            t0 = time.perf_counter()
            tok = step(tok, cache)
            times.append(time.perf_counter() - t0)
            tokens.append(int(tok))
    return times, tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path", choices=["fused", "eager", "compile"])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    if (args.path != "fused") != (os.environ.get("QWENKIT_CPU_KERNELS") == "0"):
        p.error("run fused without QWENKIT_CPU_KERNELS=0, eager and compile with it")
    torch.set_num_threads(args.threads)
    model = qwenkit.load_model(args.model, dtype=torch.float32)
    prompt = torch.randint(0, model.config.vocab_size - 1000, (1, 128), generator=torch.Generator().manual_seed(0))

    one_token = decode_step(model)  # the fused C step where the backend installs it

    def step(tok, cache):
        return one_token(tok, cache=cache)[:, -1].argmax(-1, keepdim=True)

    run = torch.compile(step, dynamic=True) if args.path == "compile" else step
    times, tokens = decode(model, run, prompt, args.steps)
    print(f"{args.path}: median {statistics.median(times[8:]) * 1e3:.1f} ms a token; first tokens {tokens[:8]}")
    if args.path == "compile":
        print(f"compile: first step {times[0]:.1f} s, second {times[1]:.1f} s (recompiled with a dynamic length)")
        again, _ = decode(model, run, prompt, 12)
        print(f"a second decode reuses the graphs: first step {again[0]:.2f} s")


if __name__ == "__main__":
    main()
