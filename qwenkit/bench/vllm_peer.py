"""vLLM's CPU build as a peer. It pins an older transformers, so it lives in its own virtualenv:
set QWENKIT_VLLM_PYTHON to that environment's python (see benchmarks/README.md)."""

from __future__ import annotations

import os


def run_vllm(spec: dict, timeout: int) -> dict:
    python = os.environ.get("QWENKIT_VLLM_PYTHON")
    if not python or not os.path.exists(python):
        return {"error": "vLLM CPU is not installed (it needs its own virtualenv; set QWENKIT_VLLM_PYTHON)"}
    return {"error": "vLLM runner not implemented for GGUF inputs yet"}
