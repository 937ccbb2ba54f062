"""Paged decode attention on one GPU: the in-place Triton kernel against the gather path.

    python benchmarks/paged_attention_gpu.py --out runs/bench/gpu/paged-attention

For the head layouts of Qwen2.5-0.5B (14 heads, 2 K/V, D 64) and 7B (28, 4, 128), batches 1/8/64
and contexts 384/4096 (bf16, blocks of 16 scattered through a pool): microseconds per layer
call of `paged_decode` (reads the blocks where they are) and of `paged_decode_torch` (gathers each
row's slots, then SDPA: what plain torch does every decode step), medians of CUDA-event timings,
with the largest difference between the two outputs.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from qwenkit.backends.paged_attention import paged_decode, paged_decode_torch

SHAPES = {"qwen2.5-0.5b": (14, 2, 64), "qwen2.5-7b": (28, 4, 128)}


def time_us(fn, repeats: int = 50) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return statistics.median(times)


def case(heads: int, n_kv: int, D: int, B: int, ctx: int, bs: int = 16) -> dict:
    n_blocks = B * (ctx // bs) + 1
    g = torch.Generator(device="cuda").manual_seed(0)
    pool = lambda: torch.randn(n_blocks * bs, n_kv, D, device="cuda", generator=g, dtype=torch.bfloat16)  # noqa: E731
    k_pool, v_pool = pool(), pool()
    q = torch.randn(B, heads, 1, D, device="cuda", generator=g, dtype=torch.bfloat16)
    tables = torch.randperm(n_blocks - 1, device="cuda", generator=g)[: B * (ctx // bs)].view(B, ctx // bs)
    lengths = torch.full((B,), ctx, device="cuda", dtype=torch.long)
    args = (q, k_pool, v_pool, tables, lengths, bs, None)
    err = (paged_decode(*args).float() - paged_decode_torch(*args).float()).abs().max().item()
    return {"in_place_us": time_us(lambda: paged_decode(*args)), "gather_us": time_us(lambda: paged_decode_torch(*args)),
            "max_abs_diff": err}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="runs/bench/gpu/paged-attention")
    args = p.parse_args()
    results = {}
    print("| shape | batch | context | in place us | gather + SDPA us | speedup | max diff |\n|---|---|---|---|---|---|---|")
    for name, (heads, n_kv, D) in SHAPES.items():
        for B in (1, 8, 64):
            for ctx in (384, 4096):
                r = results[f"{name}/b{B}/ctx{ctx}"] = case(heads, n_kv, D, B, ctx)
                print(f"| {name} | {B} | {ctx} | {r['in_place_us']:.1f} | {r['gather_us']:.1f} | "
                      f"{r['gather_us'] / r['in_place_us']:.2f}x | {r['max_abs_diff']:.3g} |", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "paged_attention.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
