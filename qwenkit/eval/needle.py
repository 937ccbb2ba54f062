"""Needle in a haystack: can the model repeat a fact hidden at depth d of an n-token context?

The haystack is plain filler prose (built in, deterministic, no download); the needle is a
random passphrase sentence placed at a sentence boundary at each depth. The prompt asks for the
passphrase; a reply that contains it scores. Prefill runs in chunks through the KV cache (bounded
memory), and each cell logs its prefill seconds and KV-cache bytes. Results: a JSON grid and a
heatmap PNG (accuracy by depth and length).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from ..backends import decode_step

FILLER = [
    "The river bends twice before it reaches the old mill at the edge of town.",
    "Farmers in the valley plant barley in spring and harvest it before the autumn rains.",
    "A lighthouse keeper writes the weather in a ledger every evening at six.",
    "The library keeps its maps in wide, shallow drawers to stop them from curling.",
    "Bakers start work long before sunrise so the bread is warm when the shops open.",
    "Migrating geese fly in a loose V to save energy on their long journeys south.",
    "The committee met on Tuesday and agreed to repaint the bridge railings green.",
    "Copper roofs turn green over the years as the metal slowly reacts with the air.",
    "In the market square a clock tower chimes every quarter hour, day and night.",
    "Children learn to skate on the frozen pond once the ice is thick enough to hold them.",
    "The orchard produces more apples than the village can eat, so most become cider.",
    "A narrow railway climbs the mountain in a series of tight switchbacks.",
]
QUESTION = "What is the secret passphrase mentioned in the text above? Reply with the passphrase only."
CHUNK = 1024  # prefill tokens per forward pass: bounds attention memory at long context


def haystack(tokenizer, n_tokens: int, depth: float, seed: int) -> tuple[str, str]:
    """(document text of about n_tokens with the needle at `depth`, the passphrase)."""
    rng = random.Random(seed)
    secret = f"{rng.choice(['amber', 'cobalt', 'violet', 'silver', 'crimson'])}-{rng.randint(1000, 9999)}"
    needle = f"The secret passphrase is {secret}."
    per_sentence = len(tokenizer.encode(" ".join(FILLER))) / len(FILLER)
    sentences = [FILLER[(i * 7 + seed) % len(FILLER)] for i in range(int(n_tokens / per_sentence))]
    sentences.insert(round(depth * len(sentences)), needle)
    return " ".join(sentences), secret


def prompt_ids(tokenizer, document: str) -> list[int]:
    messages = [{"role": "user", "content": f"{document}\n\n{QUESTION}"}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)


@torch.no_grad()
def answer(model, ids: list[int], max_new_tokens: int = 16) -> tuple[list[int], float, int]:
    """(greedy new ids, prefill seconds, KV-cache bytes) with a chunked prefill."""
    cache = model.new_cache(1, len(ids) + max_new_tokens)
    start = time.perf_counter()
    for i in range(0, len(ids), CHUNK):
        logits = model(torch.tensor([ids[i:i + CHUNK]], device=model.device), cache=cache, logits_to_keep=1)
    prefill = time.perf_counter() - start
    out, step = [], decode_step(model)
    for _ in range(max_new_tokens):
        token = int(logits[0, -1].argmax())
        if token in model.eos_token_ids:
            break
        out.append(token)
        logits = step(torch.tensor([[token]], device=model.device), cache=cache, logits_to_keep=1)
    return out, prefill, cache.k.nbytes + cache.v.nbytes


def heatmap(grid: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["length"] for r in grid})
    depths = sorted({r["depth"] for r in grid})
    cell = {(r["length"], r["depth"]): float(r["correct"]) for r in grid}
    data = [[cell.get((n, d), float("nan")) for n in lengths] for d in depths]
    fig, ax = plt.subplots(figsize=(1.4 * len(lengths) + 2, 0.8 * len(depths) + 1.5))
    ax.imshow(data, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args, out_dir: Path) -> dict:
    from ..commands.common import load
    from .perplexity import with_rope, yarn
    from .runner import finish, markdown_table
    from .store import ItemLog

    model, tokenizer = load(args)
    if args.yarn_factor:
        with_rope(model, yarn(model, args.yarn_factor))
    log = ItemLog(out_dir / "items.jsonl")
    lengths = [int(x) for x in args.lengths.split(",")]
    depths = [float(x) for x in args.depths.split(",")]
    for n in lengths:
        for d in depths:
            if f"{n}@{d}" not in log.done_ids():
                log.append(_cell(model, tokenizer, n, d, args.seed))
    grid = sorted(log.records, key=lambda r: (r["length"], r["depth"]))  # earlier runs into this dir too
    heatmap(grid, out_dir / "needle.png", f"needle in a haystack: {Path(str(args.model)).name}")
    summary = {"benchmark": "needle", "accuracy": 100.0 * sum(r["correct"] for r in grid) / max(1, len(grid)),
               "grid": grid, "settings": {"model": args.model, "dtype": args.dtype, "quantize": args.quantize,
                                          "yarn_factor": args.yarn_factor}}
    cols = ["length", "depth", "tokens", "correct", "prefill_s", "kv_mib", "reply"]
    finish(out_dir, summary, f"# Needle in a haystack\n\n{markdown_table(grid, cols)}\n\n![heatmap](needle.png)\n")
    return summary


def _cell(model, tokenizer, n: int, depth: float, seed: int, max_new_tokens: int = 16) -> dict:
    """One grid cell: the whole prompt (document, chat template, question) plus the reply fits in n tokens."""
    overhead = len(prompt_ids(tokenizer, "")) + max_new_tokens
    document, secret = haystack(tokenizer, n - overhead, depth, seed + n + int(depth * 100))
    ids = prompt_ids(tokenizer, document)
    out, prefill, kv = answer(model, ids, max_new_tokens)
    reply = tokenizer.decode(out, skip_special_tokens=True)
    return {"id": f"{n}@{depth}", "length": n, "depth": depth, "tokens": len(ids), "secret": secret,
            "reply": reply.strip(), "correct": secret in reply, "prefill_s": round(prefill, 1),
            "kv_mib": round(kv / 2**20, 1)}
