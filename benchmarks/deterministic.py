"""What `--deterministic` costs, and that it holds, on the default model.

    python benchmarks/deterministic.py [--dtype auto bfloat16] [--requests 16] [--max-tokens 32]

For each dtype: 16 chat requests sent at once through the engine, normal and deterministic
(output tok/s, median of --rounds), then the same requests one at a time under deterministic:
how many of the concurrent answers differ from the lone ones (tokens and logprobs), normal and
deterministic. Prints the host's CPU features beside the figures.
"""

from __future__ import annotations

import argparse
import statistics
import time

import qwenkit
from qwenkit.backends.host import features
from qwenkit.engine import LLM, SamplingParams
from qwenkit.weights.hub import DEFAULT_MODEL, pull

TASKS = ["Write a Python function that reverses a string.", "What is a closure in JavaScript?",
         "Explain big-O notation in two sentences.", "Write SQL to count rows per day.",
         "What does `git rebase` do?", "Write a haiku about compilers.", "Sort a list of dicts by a key in Python.",
         "What is the difference between TCP and UDP?", "Write a bash loop over files ending in .txt.",
         "Name three sorting algorithms.", "What is memoization?", "Write a C function computing a factorial.",
         "Explain what a mutex is.", "How do I read a JSON file in Python?", "What is a Docker image?",
         "Write a regex for an email address."]


def run(model, tok, prompts, params, deterministic: bool, alone: bool = False):
    llm = LLM(model, tok, deterministic=deterministic)
    start = time.perf_counter()
    outs = [llm.generate([p], params)[0] for p in prompts] if alone else llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    return [(o.token_ids, o.logprobs) for o in outs], sum(len(o.token_ids) for o in outs) / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", nargs="+", default=["auto", "bfloat16"])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    path = pull(DEFAULT_MODEL)
    tok = qwenkit.load_tokenizer(path)
    prompts = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True)
               for t in (TASKS * 4)[:args.requests]]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, logprobs=0)
    print(f"host: {features()}; {args.requests} requests, {args.max_tokens} new tokens, greedy")
    for dtype in args.dtype:
        model = qwenkit.load_model(path, dtype=dtype)
        rates = {d: [] for d in (False, True)}
        answers = {}
        for _ in range(args.rounds):
            for d in (False, True):  # alternating, so drifts of a shared host hit both
                answers[d], rate = run(model, tok, prompts, params, d)
                rates[d].append(rate)
        lone, _ = run(model, tok, prompts, params, True, alone=True)
        normal, det = statistics.median(rates[False]), statistics.median(rates[True])
        differ = {d: sum(a != b for a, b in zip(answers[d], lone)) for d in (False, True)}
        print(f"{dtype:>9}: normal {normal:7.1f} tok/s, deterministic {det:7.1f} tok/s ({det / normal:.2f}x); "
              f"answers differing from the lone ones: normal {differ[False]}/{len(prompts)}, "
              f"deterministic {differ[True]}/{len(prompts)}")


if __name__ == "__main__":
    main()
