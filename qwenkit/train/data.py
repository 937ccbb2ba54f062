"""Training data: rows read from JSONL (malformed ones counted and skipped), tokenised examples per
objective, packed fixed-length sequences, the held-out split and a seeded, resumable order.

The order is a function of (seed, position) only: epoch e visits the examples in the permutation
drawn from seed + e, and `position` counts examples consumed by all ranks together. A checkpoint
stores the position; resuming continues the same stream exactly.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import TrainingError

IGNORE = -100  # label of a position that carries no loss


@dataclass
class RowReport:
    """What reading a file kept and skipped, for the summary line."""
    source: str
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def summary(self) -> str:
        n = sum(self.skipped.values())
        if not n:
            return f"{self.source}: {self.kept} rows"
        why = "; ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items()))
        return f"{self.source}: {self.kept} rows, {n} malformed rows skipped ({why})"


def read_rows(path: str | Path, check: Callable[[dict], str | None], strict: bool = False,
              max_rows: int = 0) -> tuple[list[dict], RowReport]:
    """JSON objects from a .jsonl file (or a generated "task:NAME:N[:SEED]"); `check(row)` returns a
    reason when a row is malformed."""
    if str(path).startswith("task:"):
        from .tasks import task_rows

        rows = task_rows(str(path))[: max_rows or None]
        return rows, RowReport(str(path), kept=len(rows))
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"{path}: data file not found")
    rows, report = [], RowReport(str(path))
    with path.open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                reason = check(row) if isinstance(row, dict) else "not a JSON object"
            except json.JSONDecodeError:
                reason = "not valid JSON"
            if reason:
                if strict:
                    raise TrainingError(f"{path}:{lineno}: malformed row ({reason})")
                report.skip(reason)
                continue
            rows.append(row)
            report.kept += 1
            if max_rows and len(rows) >= max_rows:
                break
    return rows, report


def split_holdout(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, eval): a seeded random `fraction` held out (at least one item when fraction > 0)."""
    if fraction <= 0 or len(items) < 2:
        return items, []
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    n_eval = max(1, int(len(items) * fraction))
    held = set(order[:n_eval])
    return [x for i, x in enumerate(items) if i not in held], [items[i] for i in sorted(held)]


class Order:
    """The global example order: position p -> example index, epochs reshuffled from the seed."""

    def __init__(self, n: int, seed: int):
        if n == 0:
            raise TrainingError("the training set is empty")
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, None

    def indices(self, position: int, count: int) -> list[int]:
        out = []
        for p in range(position, position + count):
            epoch, k = divmod(p, self.n)
            if epoch != self._epoch:
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._epoch, self._perm = epoch, torch.randperm(self.n, generator=gen).tolist()
            out.append(self._perm[k])
        return out


# ---- pretraining: packed token windows ---------------------------------------------------------

def tokenize_corpus(docs: list[str], tokenizer, cache_dir: Path | None = None) -> np.ndarray:
    """All documents as one token stream, each followed by <|endoftext|>; cached by content hash."""
    eot = tokenizer.token_to_id("<|endoftext|>")
    key = hashlib.sha256()
    key.update(tokenizer.backend.to_str().encode())  # the whole vocabulary and pipeline
    for d in docs:
        key.update(hashlib.sha256(d.encode()).digest())
    cache = cache_dir / f"tokens-{key.hexdigest()[:16]}.npy" if cache_dir else None
    if cache is not None and cache.is_file():
        return np.load(cache)
    parts = []
    for ids in tokenizer.encode_batch(docs, allow_special=False):
        parts.append(np.asarray(ids + [eot], dtype=np.int32))
    tokens = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache.with_suffix(".tmp.npy"), tokens)
        cache.with_suffix(".tmp.npy").replace(cache)
    return tokens


def pack_windows(tokens: np.ndarray, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows of seq_len + 1 tokens (inputs and shifted targets) (N, seq_len + 1)."""
    n = (len(tokens) - 1) // seq_len
    if n < 1:
        raise TrainingError(f"the corpus has {len(tokens)} tokens, fewer than one sequence of {seq_len + 1}")
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return torch.from_numpy(tokens[idx].astype(np.int64))


def collate_windows(windows: list[torch.Tensor]) -> dict:
    x = torch.stack(windows)  # (B, T + 1)
    return {"input_ids": x[:, :-1], "labels": x[:, 1:]}


# ---- chat examples: ids with a loss mask ------------------------------------------------------

def check_messages(row: dict) -> str | None:
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return "no messages list"
    for m in msgs:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in (
                "system", "user", "assistant"):
            return "a message without a role (system/user/assistant) and string content"
    if not any(m["role"] == "assistant" for m in msgs):
        return "no assistant message"
    return None


def encode_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(ids, mask) of a conversation in the tokenizer's chat template; mask is 1 on the tokens of
    each assistant reply and its end-of-turn token, which is what SFT learns to produce."""
    ids, mask = [], []
    end_of_turn = tokenizer.token_to_id("<|im_end|>")
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=True)
            _extend_checked(ids, mask, prompt, 0)
        full = tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False, tokenize=True)
        if m["role"] != "assistant":
            _extend_checked(ids, mask, full, 0)
            continue
        reply = full[len(ids):]
        stop = reply.index(end_of_turn) + 1 if end_of_turn in reply else len(reply)
        _extend_checked(ids, mask, full[: len(ids) + stop], 1)
        _extend_checked(ids, mask, full, 0)
    return ids, mask


def _extend_checked(ids: list[int], mask: list[int], longer: list[int], value: int) -> None:
    if longer[: len(ids)] != ids:
        raise TrainingError("the chat template does not render conversations prefix by prefix; cannot mask replies")
    mask.extend([value] * (len(longer) - len(ids)))
    ids.extend(longer[len(ids):])


def masked_example(ids: list[int], mask: list[int], seq_len: int) -> dict | None:
    """Input/label tensors truncated to seq_len; None when no supervised token survives."""
    ids, mask = ids[: seq_len + 1], mask[: seq_len + 1]
    labels = [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])]
    if all(label == IGNORE for label in labels):
        return None
    return {"input_ids": torch.tensor(ids[:-1]), "labels": torch.tensor(labels)}


def pad_stack(seqs: list[torch.Tensor], value: int) -> torch.Tensor:
    """Right-padded (B, T_max); causal attention needs no mask for right padding."""
    out = torch.full((len(seqs), max(len(s) for s in seqs)), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out


def collate_masked(examples: list[dict]) -> dict:
    return {"input_ids": pad_stack([e["input_ids"] for e in examples], 0),
            "labels": pad_stack([e["labels"] for e in examples], IGNORE)}
