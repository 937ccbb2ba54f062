"""HumanEval(+) and MBPP(+): greedy pass@1, or pass@k from n samples per task (unbiased estimator).

Each sample is one program (the reply's code block, sanitized) scored in the sandbox on the base
tests (HumanEval / MBPP) and base + plus tests (HumanEval+ / MBPP+) of the same completion.
"""

from __future__ import annotations

from pathlib import Path

from .codegen import chat_prompt, extract_code, sanitize
from .codetasks import CodeTask, load_tasks, score
from .data import read_jsonl
from .metrics import mean_pass_at_k
from .runner import Item, markdown_table, run_items

PUBLISHED = {  # Qwen2.5-Coder report, Table 16: Qwen2.5-Coder-0.5B-Instruct, greedy pass@1, evalplus
    "humaneval": {"base": 61.6, "plus": 57.3},
    "mbpp": {"base": 52.4, "plus": 43.7},
}


def items(data_file: Path, tokenizer, limit: int | None = None, ids: list[str] | None = None) -> list[Item]:
    tasks = load_tasks(read_jsonl(data_file))
    if ids:
        tasks = [t for t in tasks if t.task_id in set(ids)]
    return [Item(t.task_id, chat_prompt(t.prompt, tokenizer), t) for t in tasks[:limit]]


def make_generate(llm, n: int, temperature: float, max_tokens: int, seed: int = 0):
    """Generation for run_items: n samples per item (n=1 and temperature 0: greedy), all items
    queued at once; an item is yielded when its n samples are done."""
    from ..engine.sampling_params import SamplingParams
    from .runner import stream_completions

    def generate(chunk: list[Item]):
        prompts = [item.prompt for item in chunk for _ in range(n)]
        params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=0.95 if temperature else 1.0,
                                 seed=seed + i if temperature else None, stop=("```",))
                  for _ in chunk for i in range(n)]
        samples: dict[int, dict[int, str]] = {}
        for k, text in stream_completions(llm, prompts, params):
            got = samples.setdefault(k // n, {})
            got[k % n] = text
            if len(got) == n:
                yield k // n, [got[i] for i in range(n)]
    return generate


def make_score(cache: Path | None):
    def score_samples(item: Item, samples: list[str], slot: int) -> dict:
        task: CodeTask = item.payload
        results = [_score_one(task, s, cache, slot) for s in samples]
        return {"base": [r["base"] for r in results], "plus": [r["plus"] for r in results],
                "detail": [r["detail"] for r in results]}
    return score_samples


def _score_one(task: CodeTask, sample: str, cache: Path | None, slot: int) -> dict:
    """A harness failure (not the program's) is logged as a failed sample with its reason, so a
    long run keeps going and the record shows what to rescore."""
    try:
        return score(task, sanitize(extract_code(sample), task.entry_point), cache, slot)
    except Exception as e:  # noqa: BLE001 - reported in the record
        return {"base": False, "plus": False, "detail": f"harness error: {type(e).__name__}: {e}"}


def summarize(benchmark: str, records: list[dict], ks: tuple[int, ...] = (1, 10, 100)) -> dict:
    base = [(len(r["base"]), sum(r["base"])) for r in records]
    has_plus = bool(records) and records[0]["plus"][0] is not None
    plus = [(len(r["plus"]), sum(bool(p) for p in r["plus"])) for r in records] if has_plus else []
    summary = {"benchmark": benchmark, "tasks": len(records), "samples_per_task": base[0][0] if base else 0}
    for k in ks:
        summary[f"pass@{k}"] = mean_pass_at_k(base, k)
        if has_plus:
            summary[f"plus_pass@{k}"] = mean_pass_at_k(plus, k)
    summary["published"] = PUBLISHED.get(benchmark)
    return {key: value for key, value in summary.items() if value is not None}


def report(summary: dict, records: list[dict], settings: dict) -> str:
    name = {"humaneval": "HumanEval", "mbpp": "MBPP"}.get(summary["benchmark"], summary["benchmark"])
    rows = [{"metric": k, name: summary[k], f"{name}+": summary.get("plus_" + k)}
            for k in summary if k.startswith("pass@")]
    published = summary.get("published")
    text = [f"# {name} results", "", f"Tasks: {summary['tasks']}, samples per task: {summary['samples_per_task']}.",
            "", markdown_table(rows, ["metric", name, f"{name}+"]), ""]
    if published:
        text += [f"Published (Qwen2.5-Coder-0.5B-Instruct, full precision, evalplus): {name} {published['base']}, "
                 f"{name}+ {published['plus']}.", ""]
    failed = [r["id"] for r in records if not any(r["base"])]
    text += ["Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()), "",
             f"Failed on base tests ({len(failed)}): " + ", ".join(failed), ""]
    return "\n".join(text)


def run(args, out_dir: Path) -> dict:
    from .data import resolve
    from .runner import build_llm, finish
    from .store import ItemLog

    data_file = resolve(args.task, args.data, args.source)
    llm, tokenizer = build_llm(args)
    work = items(data_file, tokenizer, args.limit)
    temperature = args.temperature if args.n > 1 else 0.0
    log = ItemLog(out_dir / "items.jsonl")
    records = run_items(work, log, make_generate(llm, args.n, temperature, args.max_tokens, args.seed),
                        make_score(out_dir.parent / "reference-cache"), desc=args.task)
    summary = summarize(args.task, records)
    settings = {"model": args.model, "dtype": args.dtype, "quantize": args.quantize, "data": data_file.name,
                "n": args.n, "temperature": temperature, "max_tokens": args.max_tokens}
    finish(out_dir, {**summary, "settings": settings}, report(summary, records, settings))
    return summary
