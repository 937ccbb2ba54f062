"""`qwenkit bench scaling`: decode tokens/s and KV memory against context length and batch size,
for the model as released (GQA) and the same model run as if every query head had its own KV head.

The MHA twin copies each KV head's projection to the query heads that share it, so it computes
exactly the same function with n_heads/n_kv times the KV cache: any speed difference is the
cost of reading the bigger cache. Decode speed at context C depends on how much K/V is read, not
on its values, so the cache is filled with random K/V up to C instead of prefilling C tokens.

`--hybrid PRESET` compares instead a random model of a hybrid preset's width (Gated DeltaNet
layers with one gated attention layer in four) against the same width with attention in every
layer: the hybrid reads K/V in a quarter of its layers and a fixed-size state in the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from ..backends import decode_step, install


@torch.no_grad()
def as_mha(model):
    """The same model with num_key_value_heads = num_attention_heads (K/V rows repeated per group)."""
    from ..loader import build_model

    cfg = model.config
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    twin = build_model(cfg.replace(num_key_value_heads=cfg.num_attention_heads), model.dtype, model.device)
    state = model.state_dict()
    q = cfg.num_attention_heads * cfg.head_dim
    for name, tensor in state.items():
        if ".qkv_proj." in name:
            qpart, k, v = tensor[:q], *tensor[q:].chunk(2, dim=0)
            expand = lambda t: t.unflatten(0, (cfg.num_key_value_heads, cfg.head_dim)).repeat_interleave(group, 0).flatten(0, 1)
            tensor = torch.cat([qpart, expand(k), expand(v)])
        state[name] = tensor
    twin.load_state_dict(state)
    twin.eos_token_ids = model.eos_token_ids
    return install(twin.eval())  # the same backend as the model's


def hybrid_shape(preset: str, layers: int, vocab: int):
    """A hybrid preset's config cut to its first `layers` layers and a `vocab`-token vocabulary."""
    from ..presets import get_preset

    cfg = get_preset(preset)
    return cfg.replace(num_hidden_layers=layers, vocab_size=vocab, layer_types=cfg.layer_types[:layers])


@torch.no_grad()
def hybrid_pair(cfg, dtype, device) -> dict:
    """Random models of a hybrid config: as it is (its layer kinds) and with full attention in
    every layer; both on the same (plain-module) backend."""
    from ..loader import build_model

    full = cfg.replace(layer_types=("full_attention",) * cfg.num_hidden_layers)
    return {name: install(build_model(c, dtype, device).init_weights(seed=0).eval())
            for name, c in (("hybrid", cfg), ("full-attn", full))}


@torch.inference_mode()
def decode_rate(model, context: int, batch: int, steps: int = 16) -> float:
    """Decode tokens/s for `batch` sequences that each already hold `context` tokens of K/V."""
    cache = model.new_cache(batch, context + steps + 1)
    kv = cache.kv if model.config.is_hybrid else cache  # a hybrid's K/V: its attention layers'
    kv.k[:, :, :, :context].normal_()
    kv.v[:, :, :, :context].normal_()
    cache.end(context)
    step = decode_step(model)
    tokens = torch.full((batch, 1), min(1000, model.config.vocab_size - 1), device=model.device)
    step(tokens, cache=cache)  # warm-up step
    t0 = time.perf_counter()
    for _ in range(steps):
        tokens = step(tokens, cache=cache)[:, -1].argmax(-1, keepdim=True)
    return batch * steps / (time.perf_counter() - t0)


def kv_bytes(model, context: int, batch: int) -> int:
    """The cache a step reads: K/V of the attention layers, and a hybrid's recurrent states."""
    from ..analysis import kv_cache_bytes_per_token, state_bytes_per_sequence

    cfg, size = model.config, model.dtype.itemsize
    return int(batch * (context * kv_cache_bytes_per_token(cfg, size) + state_bytes_per_sequence(cfg, size)))


def sweep(models: dict, contexts: list[int], batches: list[int], steps: int, repeats: int) -> list[dict]:
    """Median decode rate of each model at each point; the models alternate within a point, so a
    busy host slows them alike."""
    rows = []
    for context, batch in [(c, 1) for c in contexts] + [(contexts[0], b) for b in batches if b != 1]:
        rates = {name: [] for name in models}
        for _ in range(repeats):
            for name, model in models.items():
                rates[name].append(decode_rate(model, context, batch, steps))
        for name, model in models.items():
            rows.append({"model": name, "context": context, "batch": batch,
                         "decode_tok_s": statistics.median(rates[name]), "kv_bytes": kv_bytes(model, context, batch)})
            print(f"{name:9s} context {context:6d} batch {batch:3d}: {rows[-1]['decode_tok_s']:8.1f} tok/s, "
                  f"KV {rows[-1]['kv_bytes'] / 2**20:8.1f} MiB", flush=True)
    return rows


def main(argv: list[str], prog: str = "qwenkit bench scaling") -> int:
    from ..commands.common import add_model_args, model_options
    from ..loader import load_model
    from .bounds import weight_bytes_per_token

    p = argparse.ArgumentParser(prog=prog, description=__doc__)
    add_model_args(p, quantize=False)  # the MHA twin copies plain weights
    p.add_argument("--hybrid", metavar="PRESET", help="compare a random model of this hybrid preset's width "
                   "(e.g. qwen3.5-9b) against full attention in every layer, instead of --model against MHA")
    p.add_argument("--layers", type=int, default=4, help="--hybrid: layers of the random models (default 4)")
    p.add_argument("--vocab", type=int, default=4096, help="--hybrid: vocabulary of the random models")
    p.add_argument("--contexts", default="512,2048,8192,32768")
    p.add_argument("--batches", default="1,4,8,16,32")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", default="runs/bench")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device, dtype = model_options(args)
    if args.hybrid:
        cfg = hybrid_shape(args.hybrid, args.layers, args.vocab)
        models = hybrid_pair(cfg, torch.float32 if dtype == "auto" else dtype, device)
    else:
        gqa = load_model(args.model, dtype=dtype, device=device)
        models = {"GQA": gqa, "MHA": as_mha(gqa)}
    for name, model in models.items():
        weights = weight_bytes_per_token(model)
        per_token = kv_bytes(model, 2, 1) - kv_bytes(model, 1, 1)
        print(f"{name}: {weights / 2**20:.0f} MiB of weights and {per_token / 1024:.1f} KiB of K/V per token read "
              f"per decode step: K/V reads pass weight reads at {weights / per_token:,.0f} tokens of context "
              f"(batch x context)", flush=True)
    rows = sweep(models, [int(c) for c in args.contexts.split(",")], [int(b) for b in args.batches.split(",")],
                 args.steps, args.repeats)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "scaling.json.tmp"), "w") as f:
        json.dump(rows, f, indent=2)
    os.replace(os.path.join(args.out, "scaling.json.tmp"), os.path.join(args.out, "scaling.json"))
    _plot(rows, os.path.join(args.out, "scaling.png"))
    return 0


def _plot(rows: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in sorted({r["model"] for r in rows}):
        by_ctx = [r for r in rows if r["model"] == name and r["batch"] == 1]
        a.plot([r["context"] for r in by_ctx], [r["decode_tok_s"] for r in by_ctx], "o-", label=name)
        base = min(r["context"] for r in rows)
        by_batch = [r for r in rows if r["model"] == name and r["context"] == base]
        b.plot([r["batch"] for r in by_batch], [r["decode_tok_s"] for r in by_batch], "o-", label=name)
    a.set(xscale="log", xlabel="context (tokens)", ylabel="decode tokens/s (batch 1)", title="decode vs context")
    b.set(xscale="log", xlabel="batch", ylabel="decode tokens/s", title=f"decode vs batch (context {base})")
    a.legend()
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
