"""Options and helpers shared by the commands that load a model: generate, chat, serve, eval,
bench (its --device) and train score declare the model options here, once."""

from __future__ import annotations

import argparse
import sys


def add_model_args(parser: argparse.ArgumentParser, quantize: bool = True) -> None:
    """--model/-m, --dtype, --device and (unless the command cannot use it) --quantize."""
    from ..backends.quant import SCHEMES
    from ..dtypes import DTYPE_NAMES
    from ..weights.hub import DEFAULT_MODEL

    parser.add_argument("--model", "-m", default=DEFAULT_MODEL,
                        help=f"HF directory, .gguf file or model id (default: {DEFAULT_MODEL})")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPE_NAMES],
                        help="model dtype (default auto: on a CPU fp32 arithmetic with the weights kept no "
                        "more precise than the checkpoint's: int8 for a quantized GGUF, bf16 for bf16; on a GPU bf16)")
    add_device_arg(parser)
    if quantize:
        parser.add_argument("--quantize", default=None, choices=SCHEMES,
                            help="weight-only int8 (per channel), int4 (groups of 32) or bf16 (bf16 weights, "
                            "fp32 arithmetic) projections, made while loading")


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto",
                        help="auto (default: cuda when available, else cpu), cpu, cuda, cuda:1, ...")


def model_options(args) -> tuple[str, "torch.dtype | str"]:
    """(device, dtype) as the flags name them: the device resolved, the dtype a torch.dtype, or
    "auto", which `load_model` resolves with the checkpoint in hand (`backends.auto_plan`)."""
    from ..dtypes import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    return device, "auto" if args.dtype == "auto" else resolve_dtype(args.dtype, device)


def add_sampling_args(parser: argparse.ArgumentParser, max_new_tokens: int = 256) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--speculative", type=speculative_arg, default=None, metavar="ngram|draft:PATH|mtp",
                        help="speculative decoding: prompt lookup, a smaller model with the same tokenizer, or "
                             "the checkpoint's own multi-token-prediction head (Qwen3-Next, Qwen3.5) "
                             "(same output for greedy, same distribution when sampling)")


def speculative_arg(text: str) -> str:
    if text in ("ngram", "mtp") or (text.startswith("draft:") and len(text) > len("draft:")):
        return text
    raise argparse.ArgumentTypeError(f"expected 'ngram', 'draft:PATH' or 'mtp', got {text!r}")


SAMPLING_FLAGS = {"max_new_tokens": "max_tokens", "max_tokens": "max_tokens", "temperature": "temperature",
                  "top_k": "top_k", "top_p": "top_p", "seed": "seed"}  # flag dest -> SamplingParams field


def check_sampling_args(args) -> None:
    """RequestError naming the flag for a sampling value SamplingParams refuses (--top-p 0,
    --temperature nan), raised before the model loads rather than after."""
    from ..engine.sampling_params import SamplingParams
    from ..errors import RequestError

    for dest, name in SAMPLING_FLAGS.items():
        value = getattr(args, dest, None)  # each command has some of them
        try:
            if value is not None:
                SamplingParams(**{name: value})
        except RequestError as e:
            raise RequestError(f"--{dest.replace('_', '-')} {value}: {e}") from None


def load(args, adapter=None):
    """(model, tokenizer) for parsed args, with a progress bar on the terminal; `adapter`: a LoRA
    adapter directory merged into the weights (before --quantize). A --speculative draft model is
    loaded here too (once, for every turn), its tokenizer checked against the model's, and an MTP
head built from the checkpoint's own weights."""
    from ..loader import load_model
    from ..tokenizer import load_tokenizer

    device, dtype = model_options(args)
    model = load_model(args.model, dtype=dtype, device=device, progress=sys.stderr.isatty(),
                       adapter=adapter, quantize=args.quantize)
    if getattr(args, "speculative", None):  # generate and chat have the flag
        from ..speculative import proposer_for

        args.speculative = proposer_for(args.speculative, model)
    return model, load_tokenizer(model.source)


def stream_reply(model, tok, prompt_ids: list[int], args, out=sys.stdout) -> list[int]:
    """Generate, printing text as it becomes whole UTF-8; returns the new ids."""
    from ..generate import generate_stream

    decoder = tok.stream(skip_special_tokens=True)
    ids = []
    for token in generate_stream(model, prompt_ids, args.max_new_tokens, args.temperature, args.top_k,
                                 args.top_p, seed=args.seed, speculative=args.speculative):
        ids.append(token)
        out.write(decoder.push(token))
        out.flush()
    out.write(decoder.flush())
    out.flush()
    return ids
