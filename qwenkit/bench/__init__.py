"""`qwenkit bench`: qwenkit against its peers on the same weights and prompts, in one run.

Every configuration runs in its own process (clean memory high-water mark, thread count set
once), after and before a bandwidth / GEMM probe, so ratios compare like with like on a noisy
machine. `qwenkit bench serve` measures the HTTP server under concurrent clients instead, and
`qwenkit bench scaling` decode speed against context length and batch (GQA against MHA).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

DEFAULT_CONFIGS = ("qwenkit:auto,qwenkit:bfloat16,qwenkit:bfloat16:int8,qwenkit:bfloat16:int4,qwenkit:float32,"
                   "qwenkit:float32:bf16,qwenkit:float32:int8,qwenkit:float32:int4,transformers:bfloat16,"
                   "transformers:float32,llama.cpp:bf16,llama.cpp:gguf,vllm:bfloat16,vllm:float32")


def parse_config(text: str) -> dict:
    peer, dtype, *quant = text.split(":")
    return {"peer": peer, "dtype": dtype, "quant": quant[0] if quant else None, "name": text}


def run_config(spec: dict, timeout: int) -> dict:
    if spec["peer"] == "vllm":
        from .vllm_peer import run_vllm

        return run_vllm(spec, timeout)
    if spec["peer"] == "llama.cpp" and spec["dtype"] == "bf16":
        from .exports import bf16_gguf_for

        try:  # made here, not in the timed process, so its memory is not the peer's
            spec = {**spec, "path": str(bf16_gguf_for(spec["path"]))}
        except (ValueError, OSError) as e:
            return {"error": f"no bf16 GGUF: {e}"}
    cmd = [sys.executable, "-m", "qwenkit.bench.runners", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            return json.loads(line.removeprefix("BENCH_RESULT "))
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"exit {proc.returncode}: {tail}"}


def main(argv: list[str], prog: str = "qwenkit bench") -> int:
    if argv and argv[0] == "serve":
        from .serve import main as serve_main

        return serve_main(argv[1:], prog=f"{prog} serve")
    if argv and argv[0] == "spec":
        from .spec import main as spec_main

        return spec_main(argv[1:], prog=f"{prog} spec")
    if argv and argv[0] == "prefix":
        from .prefix import main as prefix_main

        return prefix_main(argv[1:], prog=f"{prog} prefix")
    if argv and argv[0] == "scaling":
        from .scaling import main as scaling_main

        return scaling_main(argv[1:], prog=f"{prog} scaling")
    args = _parser(prog).parse_args(argv)
    from ..dtypes import resolve_device
    from ..loader import resolve_path
    from .probes import probe
    from .report import render, save

    import torch

    torch.set_num_threads(args.threads)
    args.device = resolve_device(args.device)
    if args.model.startswith("random:"):
        from .exports import random_checkpoint

        path = str(random_checkpoint(args.model.removeprefix("random:")))
    else:
        path = str(resolve_path(args.model))
    vocab_size = _vocab_size(path)
    from ..backends.host import features

    results = {"model": args.model, "path_name": Path(path).name, "batch": args.batch, "host": features(),
               "probe_before": probe(args.device), "configs": {}}
    slow_bf16 = _slow_bf16(results["probe_before"], args.device)
    for text in args.configs.split(","):
        spec = {**parse_config(text), "path": path, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                "batch": args.batch, "repeats": args.repeats, "threads": args.threads, "device": args.device, "vocab_size": vocab_size}
        if slow_bf16 and spec["dtype"] == "bfloat16" and args.configs == DEFAULT_CONFIGS:
            results["configs"][text] = {"error": f"skipped: {slow_bf16} (name it in --configs to run it anyway)"}
            continue
        print(f"[bench] {text} ...", file=sys.stderr, flush=True)
        results["configs"][text] = run_config(spec, args.timeout)
    results["probe_after"] = probe(args.device)
    print(render(results))
    save(results, Path(args.out))
    return 0


def _vocab_size(path: str) -> int:
    from ..weights import open_checkpoint

    return int(open_checkpoint(path).config["vocab_size"])


def _slow_bf16(probe: dict, device: str) -> str | None:
    """Why bf16 configs are not worth timing here, or None: the device has no native bf16 matmul
    (the same test as `--dtype auto`), with the probe's measured rates."""
    import torch

    from ..dtypes import auto_dtype

    if auto_dtype(device) == torch.bfloat16:
        return None
    return (f"this CPU has no native bf16 matmul ({probe['bf16_gemm_GFLOPs']:.1f} GFLOP/s bf16 against "
            f"{probe['fp32_gemm_GFLOPs']:.0f} fp32)")


def _parser(prog: str) -> argparse.ArgumentParser:
    from ..commands.common import add_device_arg
    from ..weights.hub import DEFAULT_MODEL

    p = argparse.ArgumentParser(prog=prog, description=__doc__)
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="model path or id (a .gguf lets llama.cpp run too), or random:PRESET (e.g. random:qwen2.5-7b) "
                        "for random bf16 weights of that shape, made once and shared by every peer")
    p.add_argument("--configs", default=DEFAULT_CONFIGS,
                   help="comma-separated peer:dtype[:quant] (peers: qwenkit, transformers, llama.cpp, vllm); "
                        "qwenkit quant: int8, int4, bf16 (bf16 weights, fp32 arithmetic); llama.cpp dtype: "
                        "gguf (the file as it is) or bf16 (a bf16 copy of it)")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    add_device_arg(p)  # llama.cpp runs on its CPU build whatever the device
    p.add_argument("--timeout", type=int, default=1800, help="seconds per configuration")
    p.add_argument("--out", default="runs/bench", help="directory for bench.json and bench.png")
    return p
