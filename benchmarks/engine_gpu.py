"""Engine throughput on one GPU: N concurrent requests (default 64 x (256 prompt + 128 new)).

    python benchmarks/engine_gpu.py --model random:qwen2.5-0.5b --out runs/bench/gpu/engine-0.5b

qwenkit's `LLM.generate` runs with the cuda-graphs backend (static-buffer decode captured per
batch size, paged attention read in place, sampling on the device) and with plain torch, then
transformers' batched `generate` on the same weights (`--no-peer` skips it). Prints output
tokens/s, the graphs' capture time, how many of the requests' tokens the two qwenkit backends
agree on (bf16 kernels differ, so a few may part late), and the fraction of the HBM bound: a
decode step reads the weights once and every row's K/V, at the read bandwidth probed here.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

import qwenkit
from qwenkit import backends
from qwenkit.bench.bounds import weight_bytes_per_token
from qwenkit.bench.exports import random_checkpoint
from qwenkit.bench.probes import read_bandwidth
from qwenkit.bench.timing import prompts as make_prompts
from qwenkit.engine import LLM, EngineSettings, SamplingParams


def hbm_bound_tok_s(model, n: int, prompt: int, new: int, bandwidth: float) -> float:
    """Output tokens/s if each decode step only read the weights once and the rows' K/V."""
    cfg = model.config
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * model.dtype.itemsize
    step_bytes = weight_bytes_per_token(model) + n * (prompt + new / 2) * kv_per_token
    return n / (step_bytes / bandwidth)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_engine(model, backend: str, rows, new: int) -> dict:
    backends.install(model, backend)
    t0 = time.perf_counter()
    llm = LLM(model, settings=EngineSettings(max_num_seqs=len(rows), max_prefill_tokens=4096))
    start_s = time.perf_counter() - t0
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    llm.generate(rows[:4], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))  # warm-up
    sync(model.device.type)
    t0 = time.perf_counter()
    outs = llm.generate(rows, params)
    sync(model.device.type)
    seconds = time.perf_counter() - t0
    static = llm.engine.runner.static
    return {"output_tok_s": len(rows) * new / seconds, "seconds": seconds, "engine_start_s": start_s,
            "graphs": len(static.call.graphs) if static else 0, "capture_s": static.call.capture_s if static else 0.0,
            "capture_failure": static.call.failure if static else None, "tokens": [o.token_ids for o in outs]}


def run_transformers(path: Path, rows, new: int, device: str) -> dict:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
    x = torch.tensor(rows, device=device)
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    model.generate(x[:4, :16], attention_mask=torch.ones_like(x[:4, :16]),
                   **{**kw, "max_new_tokens": 8, "min_new_tokens": 8})  # warm-up
    sync(device)
    t0 = time.perf_counter()
    model.generate(x, attention_mask=torch.ones_like(x), **kw)
    sync(device)
    return {"output_tok_s": len(rows) * new / (time.perf_counter() - t0)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="random:qwen2.5-0.5b")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--no-peer", action="store_true", help="skip transformers' batched generate")
    p.add_argument("--device", default="cuda", help="cuda; cpu only to try the script on a small model")
    p.add_argument("--out", default="runs/bench/gpu/engine")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    path = random_checkpoint(args.model.removeprefix("random:"))
    model = qwenkit.load_model(path, dtype="bfloat16", device=args.device)
    model.eos_token_ids = []
    rows = make_prompts(args.requests, args.prompt_len, vocab_size=model.config.vocab_size)
    bandwidth = read_bandwidth(4.0 if args.device == "cuda" else 0.25, device=args.device)
    bound = hbm_bound_tok_s(model, args.requests, args.prompt_len, args.new_tokens, bandwidth)
    result = {"model": args.model, "requests": args.requests, "read_GBps": bandwidth / 1e9, "hbm_bound_tok_s": bound}
    for backend in ("cuda-graphs", "torch"):
        result[backend] = run_engine(model, backend, rows, args.new_tokens)
        r = result[backend]
        print(f"[engine] {args.model} {backend}: {r['output_tok_s']:,.0f} output tok/s "
              f"({r['output_tok_s'] / bound:.1%} of the HBM bound {bound:,.0f}); {r['graphs']} graphs "
              f"captured in {r['capture_s']:.2f} s{'; capture failed: ' + r['capture_failure'] if r['capture_failure'] else ''}",
              flush=True)
    same = sum(a == b for a, b in zip(result["cuda-graphs"]["tokens"], result["torch"]["tokens"]))
    result["requests_identical_across_backends"] = same
    print(f"[engine] requests with identical tokens, cuda-graphs vs torch: {same}/{args.requests}")
    del model
    if args.device == "cuda":
        torch.cuda.empty_cache()
    if not args.no_peer:
        result["transformers"] = run_transformers(path, rows, args.new_tokens, args.device)
        print(f"[engine] transformers batched generate: {result['transformers']['output_tok_s']:,.0f} output tok/s")
    for backend in ("cuda-graphs", "torch"):
        result[backend].pop("tokens")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "engine.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
