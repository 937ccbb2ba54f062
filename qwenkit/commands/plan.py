"""`qwenkit plan M`: does model M fit at a dtype, context and batch on N devices of G GB? With the breakdown."""

from __future__ import annotations

import argparse
import json

from .info import config_of


def main(argv: list[str], prog: str = "qwenkit plan") -> int:
    from ..analysis import memory_plan, plan_table

    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    parser.add_argument("model", help="preset (e.g. qwen2.5-72b, qwen3-30b-a3b), path or id")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--device-gb", type=float, default=80.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    plan = memory_plan(config_of(args.model), dtype=args.dtype, context=args.context, batch=args.batch,
                       n_devices=args.devices, device_gb=args.device_gb)
    print(json.dumps(plan, indent=2, default=str) if args.json else plan_table(plan))
    return 0
