"""Helpers for the training tests: a tiny trained tokenizer, tiny model settings, TOML configs.

Everything is small enough that a training step takes milliseconds on one CPU core.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("the cat sat on a mat and then ran to the big red house where a dog was sleeping near "
         "an old tree while birds sang songs about rain sun wind and snow").split()

TINY_MODEL = dict(model_type="qwen3", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                  tie_word_embeddings=False)


def text_lines(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 14))) for _ in range(n)]


def make_tokenizer(out_dir: Path, vocab_size: int = 300) -> Path:
    from qwenkit.train.tokenizer_train import train_tokenizer

    if not (out_dir / "tokenizer.json").is_file():
        train_tokenizer(iter(text_lines(300)), vocab_size, out_dir)
    return out_dir


def write_text(path: Path, n: int = 300, seed: int = 0) -> Path:
    path.write_text("\n".join(text_lines(n, seed)))
    return path


def write_sft(path: Path, n: int = 40, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for line in text_lines(n, seed):
            msgs = [{"role": "user", "content": line}, {"role": "assistant", "content": " ".join(rng.sample(WORDS, 4))}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


def toml_value(v) -> str:
    return json.dumps(v)  # strings, numbers, booleans and flat lists read the same in TOML


def write_config(path: Path, sections: dict) -> Path:
    """{"run": {...}, "model.config": {...}} -> a TOML file (top-level scalars under key "")."""
    lines = [f"{k} = {toml_value(v)}" for k, v in sections.get("", {}).items()]
    for name, table in sections.items():
        if name:
            lines.append(f"[{name}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def pretrain_sections(tmp: Path, **run) -> dict:
    return {
        "model": {"init": "scratch", "dtype": "float32"},
        "model.config": dict(TINY_MODEL),
        "data": {"train": str(write_text(tmp / "text.txt")), "tokenizer": str(make_tokenizer(tmp / "tok")),
                 "seq_len": 16, "eval_fraction": 0.05},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "run": {"out": str(tmp / "run"), "max_steps": 6, "batch_size": 4, "micro_batch_size": 2,
                "eval_every": 3, "checkpoint_every": 3, "eval_batches": 2, "device": "cpu", **run},
    }
