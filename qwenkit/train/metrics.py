"""Run metrics: one JSON object per line in out/metrics.jsonl, and the loss curve drawn from it.

On resume the log is cut back to the checkpoint's step first, so a killed-and-resumed run leaves
the same log as an uninterrupted one.
"""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = read_metrics(path) if resume_step is not None else []
        kept = [r for r in rows if r.get("step", 0) <= resume_step] if resume_step is not None else []
        with open(path, "w", encoding="utf-8") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")

    def write(self, row: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def read_metrics(path: Path) -> list[dict]:
    if not Path(path).is_file():
        return []
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
    return rows


def plot_losses(metrics_path: Path, png_path: Path, title: str = "") -> Path | None:
    """Training loss per step (and eval loss where measured) as a PNG; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_metrics(metrics_path)
    rewards = any("reward" in r for r in rows)  # GRPO: the reward is the curve that matters
    fig, axes = plt.subplots(1, 2 if rewards else 1, figsize=(12 if rewards else 7, 4), dpi=110, squeeze=False)
    _curve(axes[0][0], rows, "loss", "eval_loss", "loss", title)
    if rewards:
        _curve(axes[0][1], rows, "reward", "eval_reward", "mean reward", title)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return png_path


def _curve(ax, rows: list[dict], train_key: str, eval_key: str, label: str, title: str) -> None:
    train = [(r["step"], r[train_key]) for r in rows if train_key in r]
    evals = [(r["step"], r[eval_key]) for r in rows if eval_key in r]
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval", markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel(label)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
