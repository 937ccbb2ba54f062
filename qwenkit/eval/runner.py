"""The loop every generation benchmark shares: batch the pending items through the engine, score
each completion, log it (append-only, so a killed run resumes), then write the summary atomically."""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .store import ItemLog, write_atomic, write_json


@dataclass(frozen=True)
class Item:
    id: str
    prompt: object  # text, token ids or a conversation: whatever LLM.generate takes
    payload: object = None  # what the scorer needs (the task)


def build_llm(args, kv_cache_memory: int = 2 << 30):
    """(LLM, tokenizer) for the model flags: the batching engine, --batch sequences at a time, with a
    fixed KV budget (a share of free memory would grow with the machine, not the benchmark)."""
    from ..commands.common import load
    from ..engine.llm import LLM

    model, tokenizer = load(args)
    llm = LLM(model, tokenizer, max_num_seqs=args.batch, kv_cache_memory=kv_cache_memory)
    return llm, tokenizer


def stream_completions(llm, prompts: list, params: list) -> Iterator[tuple[int, str]]:
    """(index, text) of each prompt as soon as it finishes: all requests go to the engine at once,
    so continuous batching keeps `max_num_seqs` running instead of waiting for a batch's slowest."""
    engine, index, texts = llm.engine, {}, [""] * len(prompts)
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        ids = llm.encode(prompt)
        engine.validate(ids, p)
        index[engine.add_request(ids, p)] = i
    while engine.has_unfinished():
        for out in engine.step():
            i = index[out.request_id]
            texts[i] += out.text
            if out.finished:
                yield i, texts[i]


def run_items(items: list[Item], log: ItemLog, generate: Callable[[list[Item]], Iterator[tuple[int, list[str]]]],
              score: Callable[[Item, list[str], int], dict], workers: int = 2, desc: str = "eval") -> list[dict]:
    """Generate and score the items not yet in `log`; returns every record (old and new).
    `generate(items)` yields (index into items, samples) as each item's samples are done;
    `score(item, samples, slot)` runs in `workers` threads, each with its own sandbox slot, and
    each scored item is appended to the log at once (a killed run loses only unfinished items)."""
    from tqdm import tqdm

    done = log.done_ids()
    pending = [item for item in items if item.id not in done]
    bar = tqdm(total=len(items), initial=len(items) - len(pending), desc=desc, unit="item")
    lock, started = threading.Lock(), time.monotonic()
    slots = queue.Queue()
    for slot in range(workers):
        slots.put(slot)

    def finish_item(item: Item, samples: list[str]) -> None:
        slot = slots.get()
        try:
            result = score(item, samples, slot)
        finally:
            slots.put(slot)
        with lock:
            log.append({"id": item.id, "samples": samples, **result,
                        "elapsed_s": round(time.monotonic() - started, 1)})
            bar.update(1)

    with ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(finish_item, pending[i], samples) for i, samples in generate(pending)]
        for f in futures:
            f.result()
    bar.close()
    order = {item.id: i for i, item in enumerate(items)}
    return sorted((r for r in log.records if r["id"] in order), key=lambda r: order[r["id"]])


def finish(out_dir: Path, summary: dict, report_md: str) -> None:
    """summary.json and report.md, each written atomically."""
    write_json(out_dir / "summary.json", summary)
    write_atomic(out_dir / "report.md", report_md)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value) -> str:
    return f"{value:.1f}" if isinstance(value, float) else ("" if value is None else str(value))
