"""GSM8K: greedy chain-of-thought answers, scored by the final number (exact match).

The answer is read, in order of trust, from the last \\boxed{...}, a "The answer is ..." phrase,
a "#### ..." line, and else the last number in the reply. Qwen3 thinking is cut first: only the
text after the last </think> counts (a reply cut off inside its thinking falls back to all of it).
"""

from __future__ import annotations

import re
from pathlib import Path

from .runner import Item, markdown_table, run_items

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
_NUMBER = r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+"


def load_rows(rows: list[dict]) -> list[tuple[str, str, str]]:
    """(id, question, gold answer) from the official file (question/answer with '#### x') or the
    registry subset (id/prompt/expected)."""
    out = []
    for i, row in enumerate(rows):
        if "question" in row:
            out.append((f"gsm8k/{i}", row["question"], row["answer"].split("####")[-1].strip()))
        else:
            out.append((str(row.get("id", f"gsm8k/{i}")), row["prompt"], str(row["expected"])))
    return out


def strip_thinking(text: str) -> str:
    return text.rsplit("</think>", 1)[-1] if "</think>" in text else text


def extract_answer(text: str) -> str | None:
    """The final number of a reply, normalised (no commas, no trailing '.0'), or None."""
    text = strip_thinking(text)
    boxed = re.findall(r"\\boxed\{([^{}]*(?:\{[^{}]*\}[^{}]*)*)\}", text)
    candidates = [boxed[-1]] if boxed else []
    candidates += re.findall(r"answer is[:\s]*\$?\s*(" + _NUMBER + ")", text, flags=re.I)[-1:]
    candidates += re.findall(r"####\s*\$?\s*(" + _NUMBER + ")", text)[-1:]
    candidates.append(text)
    for candidate in candidates:
        numbers = re.findall(_NUMBER, candidate)
        if numbers:
            return normalise(numbers[-1])
    return None


def normalise(number: str) -> str:
    number = number.replace(",", "").rstrip(".")
    try:
        value = float(number)
    except ValueError:
        return number
    return str(int(value)) if value == int(value) else repr(value)


def is_correct(reply: str, gold: str) -> bool:
    return extract_answer(reply) == normalise(gold)


def items(rows, tokenizer, limit: int | None, thinking: bool) -> list[Item]:
    out = []
    for item_id, question, gold in load_rows(rows)[:limit]:
        messages = [{"role": "user", "content": f"{question}\n{INSTRUCTION}"}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                               enable_thinking=thinking)
        out.append(Item(item_id, prompt, gold))
    return out


def run(args, out_dir: Path) -> dict:
    from ..engine.sampling_params import SamplingParams
    from .data import read_jsonl, resolve
    from .runner import build_llm, finish, stream_completions
    from .store import ItemLog

    data_file = resolve("gsm8k", args.data, args.source)
    llm, tokenizer = build_llm(args)
    work = items(read_jsonl(data_file), tokenizer, args.limit, args.thinking)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)

    def generate(chunk):
        for i, text in stream_completions(llm, [item.prompt for item in chunk], [params] * len(chunk)):
            yield i, [text]

    def score(item, samples, slot):
        return {"gold": item.payload, "answer": extract_answer(samples[0]), "correct": is_correct(samples[0], item.payload)}

    records = run_items(work, ItemLog(out_dir / "items.jsonl"), generate, score, desc="gsm8k")
    accuracy = 100.0 * sum(r["correct"] for r in records) / max(1, len(records))
    summary = {"benchmark": "gsm8k", "problems": len(records), "accuracy": accuracy,
               "settings": {"model": args.model, "data": data_file.name, "thinking": args.thinking,
                            "max_tokens": args.max_tokens}}
    table = markdown_table([{"problems": len(records), "accuracy %": accuracy}], ["problems", "accuracy %"])
    finish(out_dir, summary, f"# GSM8K results\n\n{table}\n\nData: {data_file.name}; greedy; {INSTRUCTION!r}\n")
    return summary
