"""qwenkit at two revisions, alternating, on the same bench configurations: did a change slow anything?

    python benchmarks/ab_bench.py --base af47590 --rounds 2

Checks out `--base` into a temporary git worktree, then for each round and configuration runs
`qwenkit.bench.runners` (the timed process of `qwenkit bench`) once with the base tree first on
PYTHONPATH and once with this tree, alternating, so drifts of a shared host hit both alike.
Prints medians over rounds and the ratio this / base per figure, and whether the greedy tokens
agree. Needs the default model (or --model) in the cache.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ("prefill_tok_s", "decode_b1_tok_s", "decode_b8_tok_s")
CONFIGS = "qwenkit:float32,qwenkit:float32:bf16,qwenkit:float32:int8,qwenkit:float32:int4,qwenkit:bfloat16"


def run_once(tree: Path, spec: dict, timeout: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.run([sys.executable, "-m", "qwenkit.bench.runners", json.dumps(spec)], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            return json.loads(line.removeprefix("BENCH_RESULT "))
    return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="git revision to compare against")
    p.add_argument("--configs", default=CONFIGS)
    p.add_argument("--model", default=None, help="model path or id (default: the default model)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--timeout", type=int, default=900)
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from qwenkit.backends.host import features
    from qwenkit.loader import resolve_path

    path = str(resolve_path(args.model))
    base = Path(tempfile.mkdtemp(prefix="qwenkit-base-"))
    subprocess.run(["git", "worktree", "add", "--detach", str(base), args.base], cwd=ROOT, check=True,
                   capture_output=True)
    results: dict = {}
    try:
        for r in range(args.rounds):
            for name in args.configs.split(","):
                peer, dtype, *quant = name.split(":")
                spec = {"peer": peer, "dtype": dtype, "quant": quant[0] if quant else None, "name": name, "path": path,
                        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "batch": 8, "repeats": 1,
                        "threads": args.threads, "device": "cpu", "vocab_size": 151_936}
                for label, tree in (("base", base), ("this", ROOT)) if r % 2 == 0 else (("this", ROOT), ("base", base)):
                    print(f"[ab] round {r + 1} {name} {label} ...", file=sys.stderr, flush=True)
                    results.setdefault(name, {}).setdefault(label, []).append(run_once(tree, spec, args.timeout))
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, capture_output=True)
    print(f"{features()}; {args.threads} threads; base {args.base}; medians of {args.rounds} alternating rounds")
    print("| config | " + " | ".join(f"{f} base / this / ratio" for f in FIGURES) + " | greedy tokens |")
    print("|---|" + "---|" * (len(FIGURES) + 1))
    for name, runs in results.items():
        cells = []
        for f in FIGURES:
            vals = {k: [x[f] for x in v if f in x] for k, v in runs.items()}
            if not vals.get("base") or not vals.get("this"):
                cells.append("error")
                continue
            b, t = statistics.median(vals["base"]), statistics.median(vals["this"])
            cells.append(f"{b:.1f} / {t:.1f} / {t / b:.2f}x")
            print(f"  {name} {f}: base {[round(x, 1) for x in vals['base']]} this {[round(x, 1) for x in vals['this']]}",
                  file=sys.stderr)
        tokens = {k: [x.get("greedy_tokens") for x in v] for k, v in runs.items()}
        same = "equal" if tokens.get("base", [None])[0] == tokens.get("this", [0])[0] else "differ"
        errors = [x["error"] for v in runs.values() for x in v if "error" in x]
        print(f"| {name} | " + " | ".join(cells) + f" | {same} |" + (f" {errors[0]}" if errors else ""))


if __name__ == "__main__":
    main()
