"""Prompts for code benchmarks and the extraction of a program from a model's reply.

The instruct protocol is the one evalplus (0.2.x) uses for chat models, which the Qwen2.5-Coder
report's HumanEval/MBPP numbers come from: the task in a user message asking for a self-contained
script in a markdown block, and the assistant turn pre-filled up to an opening ```python fence, so
the model continues with code and closes the fence.
"""

from __future__ import annotations

import ast
import re

INSTRUCTION = "Please provide a self-contained Python script that solves the following problem in a markdown code block:"
RESPONSE = "Below is a Python script with a self-contained function that solves the problem and passes corresponding tests:"
_SPLIT = "<|qwenkit-split|>"


def chat_prompt(task_prompt: str, tokenizer) -> str:
    """The prompt text: chat template over [user task, assistant prefix], cut where the code starts."""
    user = f"{INSTRUCTION}\n```\n{task_prompt.strip()}\n```\n"
    assistant = f"{RESPONSE}\n```python\n{_SPLIT}\n```\n"
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    return text.split(_SPLIT)[0]


def extract_code(reply: str) -> str:
    """The code of a reply that continues an open ```python fence (or holds fenced blocks)."""
    if "```" not in reply:
        return reply
    head = reply.split("```")[0]
    if re.search(r"^(def|class|import|from) ", head, flags=re.M):  # continues the pre-filled fence
        return head
    blocks = re.findall(r"```(?:python|py)?\n(.*?)(?:```|$)", reply, flags=re.S)
    return max(blocks, key=len) if blocks else ""


def sanitize(code: str, entry_point: str) -> str:
    """Keep imports, classes, functions and top-level assignments, as evalplus's sanitizer does;
    drop example calls, prints, asserts and `if __name__ == "__main__"` blocks, which would run
    (or fail) at import time. Code that does not parse is cut at the first line that breaks it."""
    tree = _parse_prefix(code)
    if tree is None:
        return code
    lines = code.splitlines()
    keep = [node for node in tree.body if _is_definition(node)]
    kept = "\n".join("\n".join(lines[_first_line(n) - 1:n.end_lineno]) for n in keep)
    return kept + "\n" if entry_point in kept else code


def _is_definition(node) -> bool:
    return isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef,
                             ast.ClassDef, ast.Assign, ast.AnnAssign))


def _first_line(node) -> int:
    """A decorated definition starts at its first decorator."""
    return min([d.lineno for d in getattr(node, "decorator_list", [])] + [node.lineno])


def _parse_prefix(code: str):
    lines = code.splitlines()
    for end in range(len(lines), 0, -1):
        try:
            return ast.parse("\n".join(lines[:end]))
        except SyntaxError:
            continue
    return None
