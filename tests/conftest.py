"""Shared fixtures: the default model (pulled into the cache once; CI's `make test` pulls it first)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests import their helpers (tiny.py) by name


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    from qwenkit.weights.hub import DEFAULT_MODEL, pull

    return pull(DEFAULT_MODEL, progress=False)
