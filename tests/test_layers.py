"""The arrows of docs/architecture.md that must never exist, checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "qwenkit"
MODEL_CORE = ("qwen.py", "attention.py", "layers.py", "rope.py", "masks.py", "cache.py", "deltanet.py")
FORBIDDEN = {  # importing part -> parts it must never import
    "model": {"backends", "engine", "server", "train", "eval", "bench", "commands", "weights"},
    "loader": {"train", "server", "eval", "bench"},
    "weights": {"train", "engine", "server", "eval", "bench"},
    "engine": {"train", "server", "eval", "bench", "commands"},
    "backends": {"engine", "server", "train", "eval", "bench", "commands", "weights"},
    "tokenizer": {"model", "engine", "server", "backends"},
}


def imported(path: Path) -> set[str]:
    """Every qwenkit module a file imports, as dotted names (relative imports resolved)."""
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names |= {module} | {f"{module}.{a.name}" for a in node.names}
    return {n for n in names if n.split(".")[0] == "qwenkit"}


def part(path: Path) -> str:
    rel = path.relative_to(PACKAGE).parts
    return rel[0].removesuffix(".py")


def test_no_forbidden_imports_between_parts():
    bad = []
    for path in PACKAGE.rglob("*.py"):
        for name in imported(path):
            target = name.split(".")[1] if "." in name else ""
            if target in FORBIDDEN.get(part(path), ()):
                bad.append(f"{path.relative_to(PACKAGE.parent)} imports {name}")
    assert not bad, "\n".join(sorted(bad))


def test_the_model_core_is_plain_torch():
    """No kernel, fused step or quantization in the files that define the network, no probing of
    what a cache is, no branch on a tensor's device or dtype."""
    bad = []
    for name in MODEL_CORE:
        path = PACKAGE / "model" / name
        tree = ast.parse(path.read_text())
        bad += [f"{name} imports {m}" for m in imported(path) if not m.startswith(("qwenkit.model", "qwenkit.config"))]
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("hasattr", "isinstance") and node.args \
                    and "cache" in ast.unparse(node.args[0]):
                bad.append(f"{name}:{node.lineno} asks what a cache is: {ast.unparse(node)}")
            if isinstance(node, (ast.If, ast.IfExp)) and any(w in ast.unparse(node.test) for w in (".device", ".dtype")):
                bad.append(f"{name}:{node.lineno} branches on a device or dtype: {ast.unparse(node.test)}")
    assert not bad, "\n".join(bad)
