"""vLLM's CPU build as a peer. It pins its own transformers, so it lives in its own virtualenv:
QWENKIT_VLLM_PYTHON names that environment's python (default: ./.venv-vllm/bin/python; see
benchmarks/README.md). vLLM is given the same weights as every other peer: a GGUF model is
dequantized once into an HF-format directory beside the qwenkit cache."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

from .exports import hf_dir_for


def vllm_python() -> str | None:
    python = os.environ.get("QWENKIT_VLLM_PYTHON") or ".venv-vllm/bin/python"
    return python if os.path.exists(python) else None


def run_vllm(spec: dict, timeout: int) -> dict:
    python = vllm_python()
    if python is None:
        return {"error": "vLLM CPU is not installed (it needs its own virtualenv; see benchmarks/README.md)"}
    from .timing import prompts

    full = {**spec, "hf_dir": str(hf_dir_for(spec["path"])), "one": prompts(1, spec["prompt_len"], vocab_size=spec["vocab_size"]),
            "many": prompts(spec["batch"], spec["prompt_len"], seed=1, vocab_size=spec["vocab_size"])}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(full, f)
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    try:
        proc = subprocess.run([python, str(Path(__file__).with_name("vllm_runner.py")), f.name],
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    finally:
        os.unlink(f.name)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            return json.loads(line.removeprefix("BENCH_RESULT "))
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"exit {proc.returncode}: {tail}"}
