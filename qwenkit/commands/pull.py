"""`qwenkit pull M`: fetch a known model into the local cache (verified by sha256) and print its path."""

from __future__ import annotations

import argparse


def main(argv: list[str], prog: str = "qwenkit pull") -> int:
    from ..weights.hub import DEFAULT_MODEL, pull

    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"model id (default {DEFAULT_MODEL})")
    args = parser.parse_args(argv)
    print(pull(args.model))
    return 0
