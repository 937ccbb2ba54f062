"""HumanEval(+) and MBPP(+) tasks: loading, reference outputs, and scoring one solution.

With EvalPlus data (base_input / plus_input) a solution is tested the evalplus way: the reference
solution's outputs on the same inputs are the expected outputs (computed once per task in the
sandbox and cached), the base score uses base_input only and the plus score needs base_input and
plus_input. Plain HumanEval data (the registry package) has only `test`: the solution passes when
`check(entry_point)` runs clean.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from .checker import MARKER
from .sandbox import Limits, run_python

CHECKER = (Path(__file__).parent / "checker.py").read_text()
MIN_LIMIT, LIMIT_FACTOR = 2.0, 4.0  # seconds per input: max(MIN_LIMIT, LIMIT_FACTOR * reference time)
ORACLES = {"find_zero": "find_zero", "check_str": "not_none", "text_match_three": "not_none",
           "text_starta_endz": "not_none", **{name: "set" for name in (
               "similar_elements", "find_char_long", "common_in_nested_lists", "extract_singly",
               "larg_nnum", "intersection_array", "find_dissimilar", "Diff")}}


@dataclass
class CodeTask:
    task_id: str
    prompt: str
    entry_point: str
    reference: str  # a complete reference program
    test: str = ""
    base_input: list | None = None
    plus_input: list | None = None
    atol: float = 0.0


def load_tasks(rows: list[dict]) -> list[CodeTask]:
    tasks = []
    for row in rows:
        missing = {"task_id", "prompt", "entry_point", "canonical_solution"} - row.keys()
        if missing:
            raise ConfigError(f"code task {row.get('task_id', '?')}: missing fields {sorted(missing)}")
        solution = row["canonical_solution"]
        # HumanEval's canonical solution is the body that follows the prompt; MBPP's is a whole program.
        reference = solution if f"def {row['entry_point']}" in solution else row["prompt"] + solution
        tasks.append(CodeTask(row["task_id"], row["prompt"], row["entry_point"], reference, row.get("test", ""),
                              row.get("base_input"), row.get("plus_input"), float(row.get("atol") or 0)))
    return tasks


def score(task: CodeTask, code: str, cache: Path | None = None, slot: int = 0) -> dict:
    """{"base": bool, "plus": bool | None, "detail": str} for one solution program."""
    if task.base_input is None:
        program = f"{code}\n\n{task.test}\n\ncheck({task.entry_point})\n"
        outcome = run_python(program, Limits(timeout=20.0), slot=slot)
        return {"base": outcome.ok, "plus": None, "detail": outcome.status}
    truth = reference_outputs(task, cache, slot)
    base_ok, detail = _check(task, code, "base", truth, slot)
    plus_ok = False
    if base_ok and task.plus_input is not None:
        plus_ok, detail = _check(task, code, "plus", truth, slot)
    return {"base": base_ok, "plus": plus_ok if task.plus_input is not None else None, "detail": detail}


def _check(task: CodeTask, code: str, split: str, truth: dict, slot: int) -> tuple[bool, str]:
    inputs = task.base_input if split == "base" else task.plus_input
    limits = [max(MIN_LIMIT, LIMIT_FACTOR * t) for t in truth[split]["seconds"]]
    case = {"mode": "check", "code": code, "entry_point": task.entry_point, "inputs": inputs,
            "expected": truth[split]["outputs"], "limits": limits, "atol": task.atol,
            "oracle": ORACLES.get(task.entry_point)}
    outcome = run_python(CHECKER, Limits(timeout=min(sum(limits) + 10, 300)), slot=slot,
                         files={"case.pkl": pickle.dumps(case)})
    verdict = _verdict(outcome.stdout)
    if verdict is None:
        return False, f"{split}: {outcome.status}: {outcome.stderr.strip().splitlines()[-1:] or ''}"
    ok = verdict["passed"] == verdict["total"]
    return ok, f"{split}: {verdict['passed']}/{verdict['total']} inputs"


def _verdict(stdout: str) -> dict | None:
    lines = [line for line in stdout.splitlines() if line.startswith(MARKER)]
    return json.loads(lines[-1][len(MARKER):]) if lines else None


def reference_outputs(task: CodeTask, cache: Path | None = None, slot: int = 0) -> dict:
    """{"base"|"plus": {"outputs", "seconds"}} of the reference program, cached by content hash."""
    key = hashlib.sha256(json.dumps([task.reference, task.base_input, task.plus_input]).encode()).hexdigest()[:16]
    path = cache / f"{task.task_id.replace('/', '_')}-{key}.pkl" if cache else None
    if path and path.is_file():
        return pickle.loads(path.read_bytes())
    truth = {split: _run_reference(task, inputs, slot)
             for split, inputs in (("base", task.base_input), ("plus", task.plus_input)) if inputs is not None}
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".tmp").write_bytes(pickle.dumps(truth))
        path.with_suffix(".tmp").replace(path)
    return truth


def _run_reference(task: CodeTask, inputs: list, slot: int) -> dict:
    case = {"mode": "truth", "code": task.reference, "entry_point": task.entry_point, "inputs": inputs,
            "limits": [60.0]}
    outcome = run_python(CHECKER, Limits(timeout=600, memory=4 << 30, file_size=512 << 20), slot=slot,
                         files={"case.pkl": pickle.dumps(case)}, collect=("out.pkl",))
    if "out.pkl" not in outcome.files:
        raise ConfigError(f"{task.task_id}: reference solution failed ({outcome.status}): {outcome.stderr[-300:]}")
    return pickle.loads(outcome.files["out.pkl"])  # written by the trusted reference program only
