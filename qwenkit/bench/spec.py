"""`qwenkit bench spec`: speculative decoding against plain decoding, same model, same run, batch 1.

Two workloads: a code edit (the prompt holds a function and asks for it back with one name
changed: the output mostly copies the prompt, where prompt lookup pays) and free-form chat (little
to copy: the proposer should back off, so speculation costs nothing). Runs alternate plain and
speculative; each reports decode tokens/s (first token to last, the prefill excluded), the
speculative/plain ratio of the medians, whether the tokens were identical (greedy), the acceptance
rate and the mean number of proposals kept per verify call. A `random:PRESET` model (no
tokenizer) gets token-id prompts of the same shape: it measures the verify step's cost, not
acceptance.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

FUNCTION = '''def merge_intervals(intervals, min_gap=0):
    """Merge overlapping [start, end] intervals; gaps up to min_gap are closed too."""
    if not intervals:
        return []
    ordered = sorted(intervals, key=lambda pair: pair[0])
    merged = [list(ordered[0])]
    for start, end in ordered[1:]:
        last = merged[-1]
        if start <= last[1] + min_gap:
            last[1] = max(last[1], end)
        else:
            merged.append([start, end])
    total = sum(end - start for start, end in merged)
    print(f"merged {len(intervals)} intervals into {len(merged)} covering {total}")
    return merged
'''
WORKLOADS = {
    "code-edit": "Rename the parameter `min_gap` to `tolerance` everywhere in this function, keep everything "
                 "else exactly as it is, and output only the whole function in a code block.\n\n```python\n"
                 + FUNCTION + "```",
    "chat": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
}


def prompt_ids(model, tok, name: str) -> list[int]:
    if tok is not None:
        return tok.encode_chat([{"role": "user", "content": WORKLOADS[name]}])
    gen = torch.Generator().manual_seed(0)
    block = torch.randint(0, model.config.vocab_size, (160,), generator=gen).tolist()
    return block * 2 if name == "code-edit" else block


def timed(model, ids: list[int], max_new: int, speculative) -> dict:
    from ..generate import generate_stream
    from ..speculative import SpecStats

    stats, out, first = SpecStats(), [], None
    for token in generate_stream(model, ids, max_new, speculative=speculative, spec_stats=stats):
        out.append(token)
        first = first or time.perf_counter()
    seconds = time.perf_counter() - first
    return {"tokens": out, "tok_s": (len(out) - 1) / seconds if len(out) > 1 else 0.0, "stats": stats}


def run(model, tok, name: str, args) -> dict:
    ids = prompt_ids(model, tok, name)
    plain, spec = [], []
    for _ in range(args.repeats):  # alternating, so a noisy neighbour hits both alike
        plain.append(timed(model, ids, args.max_new_tokens, None))
        spec.append(timed(model, ids, args.max_new_tokens, args.speculative))
    p, s = statistics.median(r["tok_s"] for r in plain), statistics.median(r["tok_s"] for r in spec)
    st = spec[-1]["stats"]
    return {"workload": name, "prompt_tokens": len(ids), "new_tokens": len(plain[-1]["tokens"]),
            "plain_tok_s": round(p, 2), "spec_tok_s": round(s, 2), "speedup": round(s / p, 3),
            "identical": all(r["tokens"] == plain[0]["tokens"] for r in plain + spec),
            "acceptance_rate": round(st.acceptance_rate, 3), "mean_accepted": round(st.mean_accepted, 2),
            "verify_calls": st.verify_calls, "plain_steps": st.plain_steps}


def main(argv: list[str], prog: str = "qwenkit bench spec") -> int:
    from ..commands.common import add_model_args, load, model_options, speculative_arg
    from .exports import random_checkpoint

    p = argparse.ArgumentParser(prog=prog, description=__doc__)
    add_model_args(p)
    p.add_argument("--speculative", type=speculative_arg, default="ngram")
    p.add_argument("--workloads", default="code-edit,chat")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", default="runs/bench")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    tok = None
    if args.model.startswith("random:"):
        from ..loader import load_model
        from ..speculative import proposer_for

        device, dtype = model_options(args)
        model = load_model(random_checkpoint(args.model.removeprefix("random:")), dtype=dtype, device=device)
        args.speculative = proposer_for(args.speculative, model)
    else:
        model, tok = load(args)
    spec_name = args.speculative if isinstance(args.speculative, str) else type(args.speculative).__name__
    rows = []
    for name in args.workloads.split(","):
        rows.append(run(model, tok, name, args))
        print(json.dumps(rows[-1]), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "spec.json"), "w") as f:
        json.dump({"model": args.model, "speculative": spec_name, "threads": args.threads, "rows": rows}, f, indent=2)
    return 0
