"""Small verifiable tasks for the fine-tuning recipes: a row generator and a reward per task.

`json_extract` (SFT): pull a person's name, age and city out of a sentence and answer with
exactly `{"name": ..., "age": ..., "city": ...}` -- a fixed format the base model does not know.
`arithmetic` (GRPO): `a * b + c` with two-digit a and b, answered inside <answer></answer>; the
checker is exact. `arithmetic_small`: `a * b` with a one-digit a and no added term, which the 0.5B
model gets right about half the time when sampling at temperature 1 -- often enough for a group of
samples to disagree (GRPO learns only from groups whose rewards differ). On `arithmetic` it is right
about 2 % of the time, so nearly every group has the same reward and GRPO has nothing to learn from.
Rows are JSONL-ready dicts; a reward maps (completion text, row) to a number in [0, 1].
"""

from __future__ import annotations

import json
import random
import re
from typing import Callable

from ..errors import ConfigError

NAMES = ["Maria", "Tom", "Aisha", "Kenji", "Lena", "Omar", "Sofia", "Ivan", "Chloe", "Rahul", "Nora", "Diego",
         "Mei", "Lucas", "Fatima", "Jonas", "Priya", "Emil", "Zara", "Pablo", "Hana", "Felix", "Amara", "Leo"]
CITIES = ["Lisbon", "Osaka", "Nairobi", "Toronto", "Berlin", "Lima", "Hanoi", "Oslo", "Cairo", "Quito",
          "Dublin", "Seoul", "Perth", "Accra", "Zurich", "Austin", "Porto", "Delhi", "Riga", "Tunis"]
TEMPLATES = [
    "{name} is {age} years old and lives in {city}.",
    "Born {age} years ago, {name} now calls {city} home.",
    "{city} resident {name} ({age}) joined the club last week.",
    "At {age}, {name} moved to {city} for work.",
    "Meet {name}: {age}, living in {city}, loves hiking.",
    "Our new colleague from {city}, {name}, turned {age} this spring.",
]
JSON_SYSTEM = "You are a data extraction service."


def json_extract_row(rng: random.Random) -> dict:
    person = {"name": rng.choice(NAMES), "age": rng.randint(18, 90), "city": rng.choice(CITIES)}
    sentence = rng.choice(TEMPLATES).format(**person)
    messages = [{"role": "system", "content": JSON_SYSTEM},
                {"role": "user", "content": f"Extract the person from this text: {sentence}"},
                {"role": "assistant", "content": json.dumps(person)}]
    return {"messages": messages, "answer": person}


def arithmetic_row(rng: random.Random, a_range: tuple[int, int] = (12, 99), add: bool = True) -> dict:
    a, b = rng.randint(*a_range), rng.randint(12, 99)
    c = rng.randint(10, 99) if add else 0
    question = f"{a} * {b} + {c}" if add else f"{a} * {b}"
    prompt = f"What is {question}? Give the final answer as <answer>NUMBER</answer>."
    return {"prompt": prompt, "answer": a * b + c}


TASKS: dict[str, Callable[[random.Random], dict]] = {
    "json_extract": json_extract_row, "arithmetic": arithmetic_row,
    "arithmetic_small": lambda rng: arithmetic_row(rng, (3, 9), add=False)}


def make_rows(task: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [TASKS[task](rng) for _ in range(n)]


def task_rows(spec: str) -> list[dict]:
    """Rows of "task:NAME:N[:SEED]" (a data source a config can name instead of a file)."""
    parts = spec.split(":")
    if len(parts) not in (3, 4) or parts[1] not in TASKS or not all(p.isdigit() for p in parts[2:]):
        raise ConfigError(f"{spec!r}: want task:NAME:N[:SEED] with NAME one of {', '.join(TASKS)}")
    return make_rows(parts[1], int(parts[2]), int(parts[3]) if len(parts) == 4 else 0)


def arithmetic_reward(completion: str, row: dict) -> float:
    """1 for the right number inside <answer> tags, 0.2 for the tags with a wrong number, else 0."""
    m = re.search(r"<answer>\s*(-?[\d,]+)\s*</answer>", completion)
    if not m:
        return 0.0
    return 1.0 if int(m[1].replace(",", "")) == int(row["answer"]) else 0.2


def json_extract_reward(completion: str, row: dict) -> float:
    """1 for exactly the expected object, 0.5 for a JSON object with the right keys, else 0."""
    try:
        got = json.loads(completion.strip())
    except json.JSONDecodeError:
        return 0.0
    if got == row["answer"]:
        return 1.0
    return 0.5 if isinstance(got, dict) and set(got) == set(row["answer"]) else 0.0


REWARDS: dict[str, Callable[[str, dict], float]] = {"arithmetic": arithmetic_reward, "json_extract": json_extract_reward}


def prompt_messages(row: dict) -> list[dict]:
    """The conversation a row asks the model to continue (its final assistant reply removed)."""
    if "messages" in row:
        msgs = row["messages"]
        return msgs[:-1] if msgs and msgs[-1]["role"] == "assistant" else msgs
    prompt = row["prompt"]
    return prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
