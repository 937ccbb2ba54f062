"""Speculative decoding in the batching engine (prompt lookup, with its back-off) against plain
decoding, on the default model, same run: the code-edit and chat workloads of `qwenkit bench
spec`, at 1 and 4 concurrent requests. Runs alternate plain and speculative; each reports output
tokens/s over the whole run (the prefill is the same in both), the ratio of the medians, whether
the tokens were identical (greedy), and the guesses proposed and kept.

    python benchmarks/spec_engine.py [--model M] [--max-tokens 96] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from qwenkit import load_model, load_tokenizer
from qwenkit.backends.host import features
from qwenkit.bench.spec import WORKLOADS
from qwenkit.engine import Engine, EngineSettings, SamplingParams
from qwenkit.engine.sampling_params import SpeculativeParams
from qwenkit.loader import resolve_path


def run(model, prompts: list[list[int]], params: SamplingParams) -> tuple[float, list[list[int]], dict]:
    """(output tokens/s, each request's tokens, the engine's metrics) for the prompts run together."""
    engine = Engine(model, EngineSettings(max_num_seqs=len(prompts), kv_cache_memory=256 * 2**20))
    ids = [engine.add_request(p, params) for p in prompts]
    out = {i: [] for i in ids}
    start = time.perf_counter()
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id] += o.token_ids
    seconds = time.perf_counter() - start
    return sum(map(len, out.values())) / seconds, [out[i] for i in ids], engine.metrics()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    path = resolve_path(args.model)
    model, tok = load_model(path), load_tokenizer(path)
    plain = SamplingParams(max_tokens=args.max_tokens, temperature=0)
    spec = plain.replace(speculative=SpeculativeParams(num_speculative_tokens=8))
    print(f"host: {features()}; {args.model}, {args.threads} threads, {args.max_tokens} tokens a request, "
          f"medians of {args.repeats}")
    for name, text in WORKLOADS.items():
        prompt = tok.encode_chat([{"role": "user", "content": text}])
        for batch in (1, 4):
            rates = {"plain": [], "spec": []}
            for _ in range(args.repeats):
                base, want, _ = run(model, [prompt] * batch, plain)
                fast, got, m = run(model, [prompt] * batch, spec)
                rates["plain"].append(base)
                rates["spec"].append(fast)
            a, b = statistics.median(rates["plain"]), statistics.median(rates["spec"])
            print(f"{name:10s} batch {batch}: plain {a:6.1f} tok/s, speculative {b:6.1f} tok/s, {b / a:.2f}x; "
                  f"tokens identical: {got == want}; guesses kept {int(m['spec_accepted_tokens'])}"
                  f"/{int(m['spec_draft_tokens'])}")


if __name__ == "__main__":
    main()
