"""Perplexity of a model on a text file, in sliding windows, with the loss by position.

Windows of `context` tokens advance by `stride`; each scores only the tokens the previous window
did not (the first scores all), so every token is scored once with as much left context as the
stride allows. Each window is one logged item, so a killed run resumes.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..errors import ConfigError
from ..model.rope import Rope


def with_rope(model, rope: dict):
    """Swap the rope settings of a built model (e.g. add YaRN): a new config and a new Rope; the
    weights are shared, the old config is not changed."""
    rope = {"rope_theta": model.config.rope["rope_theta"], **rope}
    model.config = model.config.replace(rope=rope)
    model.rope = Rope(rope, model.config.head_dim, model.config.max_position_embeddings)
    return model


def yarn(model, factor: float) -> dict:
    return {"rope_type": "yarn", "factor": factor,
            "original_max_position_embeddings": model.config.max_position_embeddings}


@torch.no_grad()
def token_losses(model, ids: list[int]) -> torch.Tensor:
    """Next-token negative log-likelihood at each position 1..T-1 of one window, float32 (T-1,)."""
    x = torch.tensor([ids], device=model.device)
    logits = model(x)[0, :-1].float()  # (T-1, V)
    return torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="none").cpu()


def windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first scored position within the window) covering every token once."""
    out, scored_to = [], 0
    for start in range(0, max(1, n_tokens - 1), stride):
        begin = max(0, min(start, scored_to - 1))  # the first new target needs its previous token
        end = min(begin + context, n_tokens)
        out.append((begin, end, max(1, scored_to - begin)))
        scored_to = end
        if end == n_tokens:
            break
    return out


def bucket_means(losses_by_pos: dict[int, list[float]], context: int, buckets: int = 8) -> list[dict]:
    size = max(1, context // buckets)
    rows = []
    for b in range(buckets):
        vals = [v for p in range(b * size, (b + 1) * size) for v in losses_by_pos.get(p, [])]
        if vals:
            rows.append({"positions": f"{b * size}-{(b + 1) * size - 1}", "loss": sum(vals) / len(vals),
                         "ppl": math.exp(sum(vals) / len(vals))})
    return rows


def run(args, out_dir: Path) -> dict:
    from ..commands.common import load
    from .runner import finish, markdown_table
    from .store import ItemLog

    if not args.data:
        raise ConfigError("perplexity needs --data TEXT_FILE")
    model, tokenizer = load(args)
    if args.yarn_factor:
        with_rope(model, yarn(model, args.yarn_factor))
    ids = tokenizer.encode(Path(args.data).read_text(encoding="utf-8"))
    log = ItemLog(out_dir / "items.jsonl")
    done = log.done_ids()
    for start, end, first in windows(len(ids), args.context, args.stride or args.context):
        if f"w{start}" not in done:
            losses = token_losses(model, ids[start:end])[first - 1:]
            log.append({"id": f"w{start}", "start": start, "first": first, "losses": [round(v, 4) for v in losses.tolist()]})
    by_pos: dict[int, list[float]] = {}
    for r in log.records:
        for i, v in enumerate(r["losses"]):
            by_pos.setdefault(r["first"] + i, []).append(v)
    all_losses = [v for vals in by_pos.values() for v in vals]
    mean = sum(all_losses) / len(all_losses)
    summary = {"benchmark": "perplexity", "tokens": len(all_losses), "loss": mean, "perplexity": math.exp(mean),
               "by_position": bucket_means(by_pos, args.context), "settings": {"model": args.model, "data": args.data,
               "context": args.context, "stride": args.stride or args.context, "yarn_factor": args.yarn_factor}}
    table = markdown_table(summary["by_position"], ["positions", "loss", "ppl"])
    finish(out_dir, summary, f"# Perplexity\n\n{len(all_losses)} tokens: perplexity {math.exp(mean):.3f}\n\n{table}\n")
    return summary
