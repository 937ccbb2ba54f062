"""Options and helpers shared by the generation commands."""

from __future__ import annotations

import argparse
import sys

def add_model_args(parser: argparse.ArgumentParser) -> None:
    from ..loader import DTYPE_NAMES
    from ..weights.hub import DEFAULT_MODEL

    parser.add_argument("--model", "-m", default=DEFAULT_MODEL,
                        help=f"HF directory, .gguf file or model id (default: {DEFAULT_MODEL})")
    parser.add_argument("--dtype", default="auto", choices=["auto", *sorted(DTYPE_NAMES)],
                        help="weight dtype (default auto: bf16 where the hardware has it natively, else fp32)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    parser.add_argument("--quantize", default=None, choices=["int8", "int4", "bf16"],
                        help="weight-only int8 (per channel), int4 (groups of 32) or bf16 (bf16 weights, fp32 "
                        "arithmetic) projections, made while loading")


def add_sampling_args(parser: argparse.ArgumentParser, max_new_tokens: int = 256) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)


def load(args):
    """(model, tokenizer) for parsed args, with a progress bar on the terminal."""
    from .. import load_model, load_tokenizer
    from ..loader import resolve_dtype

    model = load_model(args.model, dtype=resolve_dtype(args.dtype, args.device), device=args.device,
                       progress=sys.stderr.isatty(), quantize=args.quantize)
    return model, load_tokenizer(model.source)


def stream_reply(model, tok, prompt_ids: list[int], args, out=sys.stdout) -> list[int]:
    """Generate, printing text as it becomes whole UTF-8; returns the new ids."""
    from ..generate import generate_stream

    decoder = tok.stream(skip_special_tokens=True)
    ids = []
    for token in generate_stream(model, prompt_ids, args.max_new_tokens, args.temperature, args.top_k,
                                 args.top_p, seed=args.seed):
        ids.append(token)
        out.write(decoder.push(token))
        out.flush()
    out.write(decoder.flush())
    out.flush()
    return ids
