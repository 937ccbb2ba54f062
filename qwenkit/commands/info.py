"""`qwenkit info M`: the architecture of a preset, checkpoint directory, .gguf file or model id."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def config_of(name: str | None):
    """QwenConfig of a local path, else a preset name, else a model id (read without loading weights)."""
    from ..config import QwenConfig
    from ..loader import resolve_path
    from ..presets import PRESETS, get_preset
    from ..weights import open_checkpoint

    if name is not None and not Path(name).exists() and name.lower().removeprefix("qwen/") in PRESETS:
        return get_preset(name)
    return QwenConfig.from_dict(open_checkpoint(resolve_path(name)).config)


def main(argv: list[str], prog: str = "qwenkit info") -> int:
    from ..analysis import info_dict, info_table
    from ..weights.hub import DEFAULT_MODEL

    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="preset (e.g. qwen2.5-72b), path or id")
    parser.add_argument("--dtype", default="bf16", help="dtype of the KV cache figures (bf16, fp32, int8, ...)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    cfg = config_of(args.model)
    if args.json:
        print(json.dumps(info_dict(cfg, dtype=args.dtype), indent=2))
    else:
        print(info_table(cfg, name=args.model, dtype=args.dtype))
    return 0
