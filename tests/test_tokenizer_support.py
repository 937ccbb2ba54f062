"""Shared helpers for the tokenizer tests: where the default model's GGUF and the official
tokenizer files are (no tests here)."""

import os
from pathlib import Path

import pytest

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"
DATA = Path(__file__).parent / "data" / "tokenizer"


def default_gguf() -> Path:
    """The default model's GGUF, through the hub resolver when it exists; skip if absent."""
    try:
        from qwenkit.weights.hub import resolve
        path = Path(resolve(DEFAULT_MODEL))
    except Exception:  # resolver not there yet, or model not downloaded
        home = Path(os.environ.get("QWENKIT_HOME", Path.home() / ".cache" / "qwenkit"))
        path = home / "models" / DEFAULT_MODEL / f"{DEFAULT_MODEL}-q4_k_m.gguf"
    if path.is_dir():
        path = next(iter(sorted(path.glob("*.gguf"))), path)
    if not path.is_file():
        pytest.skip(f"default model {DEFAULT_MODEL} not downloaded")
    return path
