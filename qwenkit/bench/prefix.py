"""`qwenkit bench prefix`: what a hybrid model's prefix cache saves - time to first token of a
request whose long prefix (a system prompt, a document) an earlier request already computed, with
the prefix cache (a hit: the recurrent state snapshot after the prefix, and the attention layers'
cached K/V blocks) against the same engine without it, on a random model of a hybrid preset's width.

Each repeat draws a fresh prefix and runs, on both engines, a first request (prefix + its own
suffix: computed in full, snapshots kept) and then the timed one (prefix + another suffix); the
tokens of the timed request must be the same with and without the hit.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from .scaling import hybrid_shape


def first_token(engine, prompt: list[int], max_tokens: int) -> tuple[float, list[int]]:
    """(seconds from add_request to the first token, the request's tokens)."""
    from ..engine import SamplingParams

    start, ttft, tokens = time.perf_counter(), None, []
    rid = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == rid and out.token_ids and ttft is None:
                ttft = time.perf_counter() - start
            tokens += out.token_ids if out.request_id == rid else []
    return ttft, tokens


def run(model, prefix_len: int, suffix_len: int, repeats: int, max_tokens: int, interval: int) -> dict:
    from ..engine import Engine, EngineSettings

    settings = dict(block_size=16, max_num_seqs=2, num_blocks=4 * -(-(prefix_len + suffix_len + max_tokens) // 16),
                    max_prefill_tokens=max(512, prefix_len + suffix_len), state_snapshot_interval=interval)
    engines = {"hit": Engine(model, EngineSettings(**settings)),
               "no cache": Engine(model, EngineSettings(**settings, enable_prefix_caching=False))}
    vocab, g = model.config.vocab_size, torch.Generator().manual_seed(0)
    for engine in engines.values():  # warm-up: the first calls pay for allocations and kernel setup
        first_token(engine, torch.randint(0, vocab, (suffix_len + 1,), generator=g).tolist(), 2)
    rows: dict[str, list[float]] = {"first (no hit)": [], "hit": [], "no cache": []}
    same = True
    for _ in range(repeats):
        prefix = torch.randint(0, vocab, (prefix_len,), generator=g).tolist()
        a, b = (prefix + torch.randint(0, vocab, (suffix_len,), generator=g).tolist() for _ in range(2))
        answers = {}
        for name, engine in engines.items():
            ttft, _ = first_token(engine, a, max_tokens)
            if name == "hit":
                rows["first (no hit)"].append(ttft)
            ttft, answers[name] = first_token(engine, b, max_tokens)
            rows[name].append(ttft)
        same &= answers["hit"] == answers["no cache"]
    m = engines["hit"].metrics()
    ttft = {name: statistics.median(v) for name, v in rows.items()}
    return {"ttft_s": ttft, "speedup": ttft["no cache"] / ttft["hit"], "tokens_identical": same,
            "hit_rate": m["prefix_cache_hit_tokens"] / m["prefix_cache_queried_tokens"],
            "hit_tokens": m["prefix_cache_hit_tokens"], "queried_tokens": m["prefix_cache_queried_tokens"]}


def main(argv: list[str], prog: str = "qwenkit bench prefix") -> int:
    from ..backends import install
    from ..backends.host import features
    from ..loader import build_model

    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--hybrid", default="qwen3.5-9b", metavar="PRESET", help="hybrid preset whose width to use")
    p.add_argument("--layers", type=int, default=4, help="layers of the random model (default 4: 3 DeltaNet, 1 attention)")
    p.add_argument("--vocab", type=int, default=4096, help="vocabulary of the random model")
    p.add_argument("--prefix", type=int, default=512, help="shared prefix tokens (default 512)")
    p.add_argument("--suffix", type=int, default=32, help="tokens after it, different per request (default 32)")
    p.add_argument("--interval", type=int, default=256, help="state snapshot interval (default 256)")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = hybrid_shape(args.hybrid, args.layers, args.vocab)
    model = install(build_model(cfg, getattr(torch, args.dtype), "cpu").init_weights(seed=0).eval())
    model.eos_token_ids = []
    result = {"host": features(), "preset": args.hybrid, "layers": args.layers, "dtype": args.dtype,
              "prefix": args.prefix, "suffix": args.suffix,
              **run(model, args.prefix, args.suffix, args.repeats, args.max_tokens, args.interval)}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"host: {result['host']}")
    print(f"{args.hybrid} width, {args.layers} layers, {args.dtype}; prefix {args.prefix} + suffix {args.suffix} tokens; "
          f"medians of {args.repeats}")
    for name, seconds in result["ttft_s"].items():
        print(f"  time to first token, {name:15s} {seconds * 1e3:9.1f} ms")
    print(f"  hit vs no cache: {result['speedup']:.2f}x lower; tokens identical: {result['tokens_identical']}; "
          f"prefix-cache hit rate {result['hit_rate']:.3f} ({result['hit_tokens']}/{result['queried_tokens']} tokens)")
    return 0 if result["tokens_identical"] else 1
