"""`qwenkit generate`: raw completion of a prompt, no chat template, streamed to stdout."""

from __future__ import annotations

import argparse

from .common import add_model_args, add_sampling_args, check_sampling_args, load, stream_reply


def main(argv: list[str], prog: str = "qwenkit generate") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    add_model_args(parser)
    add_sampling_args(parser)
    parser.add_argument("--prompt", "-p", required=True, help="text to continue")
    args = parser.parse_args(argv)
    check_sampling_args(args)
    model, tok = load(args)
    print(args.prompt, end="", flush=True)
    stream_reply(model, tok, tok.encode(args.prompt), args)
    print()
    return 0
