"""One benchmark configuration per process: qwenkit, transformers or llama.cpp on the same weights.

Each runner exposes the same three timed operations on the same prompts — prefill of a prompt
(returning the first greedy token), batch-1 decode steps and batch-8 decode steps — so the
driver can time them identically. Run with `python -m qwenkit.bench.runners SPEC_JSON`.

`transformers:DTYPE:compiled` is transformers at its fastest on a GPU: its static cache and the
decode forward under `torch.compile(mode="reduce-overhead")` (CUDA graphs). The qwenkit and
compiled runners keep one cache per batch shape and warm it (compile / capture its decode step)
the first time a shape is seen, outside the timed steps.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import torch

from ..dtypes import resolve_dtype


class QwenkitRunner:
    def __init__(self, path, dtype: str, quant: str | None, device: str = "cpu"):
        import qwenkit
        from qwenkit.backends import decode_step

        self.device = device
        self.model = qwenkit.load_model(path, dtype=dtype, device=device, quantize=quant)  # names, "auto" too
        self.cache = None
        self.caches = {}  # (batch, length) -> a static cache, reused (its decode graph with it)
        self.decode = decode_step(self.model)

    @torch.inference_mode()
    def prefill(self, ids: list[list[int]], extra: int) -> list[int]:
        key = (len(ids), len(ids[0]) + max(extra, 4))
        fresh = key not in self.caches
        if fresh:
            self.caches[key] = self.model.new_cache(*key)
        self.cache = self.caches[key]
        return _prefill_warm(self, ids, fresh and self.model.device.type == "cuda")  # a CPU has no graph to capture

    def _prefill(self, ids: list[list[int]]) -> list[int]:
        self.cache.trim(self.cache.length)  # from empty
        logits = self.model(torch.tensor(ids, device=self.device), cache=self.cache, logits_to_keep=1)  # (B, 1, V)
        return logits[:, -1].argmax(-1).tolist()

    @torch.inference_mode()
    def step(self, tokens: list[int]) -> list[int]:
        logits = self.decode(torch.tensor(tokens, device=self.device)[:, None], cache=self.cache)  # (B, 1, V)
        return logits[:, -1].argmax(-1).tolist()


class TransformersRunner:
    def __init__(self, path, dtype: str, quant: str | None, device: str = "cpu"):
        import transformers

        path = Path(path)
        kw = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
        root = path.parent if path.suffix == ".gguf" else path
        self.model = transformers.AutoModelForCausalLM.from_pretrained(root, dtype=resolve_dtype(dtype, device), **kw)
        self.model = self.model.to(device).eval()
        self.device, self.past = device, None

    @torch.inference_mode()
    def prefill(self, ids, extra):
        out = self.model(torch.tensor(ids, device=self.device), use_cache=True, logits_to_keep=1)
        self.past = out.past_key_values
        return out.logits[:, -1].argmax(-1).tolist()

    @torch.inference_mode()
    def step(self, tokens):
        out = self.model(torch.tensor(tokens, device=self.device)[:, None], past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        return out.logits[:, -1].argmax(-1).tolist()


class TransformersCompiledRunner(TransformersRunner):
    """transformers' static cache with the decode forward compiled (`compile=False`: the same calls
    eagerly, which is what a CPU test can afford)."""

    def __init__(self, path, dtype: str, quant: str | None, device: str = "cpu", compile: bool = True):
        super().__init__(path, dtype, None, device)
        self.caches, self.pos = {}, 0
        forward = self.model.forward
        self.decode = torch.compile(forward, mode="reduce-overhead", fullgraph=True) if compile else forward

    @torch.inference_mode()
    def prefill(self, ids, extra):
        from transformers import StaticCache

        key = (len(ids), len(ids[0]) + max(extra, 4))
        fresh = key not in self.caches
        if fresh:
            self.caches[key] = StaticCache(config=self.model.config, max_cache_len=key[1])
        self.past = self.caches[key]
        return _prefill_warm(self, ids, fresh)

    def _prefill(self, ids):
        self.pos = len(ids[0])
        self.past.reset()  # from empty (layers not yet allocated are left as they are)
        x = torch.tensor(ids, device=self.device)
        out = self.model(x, past_key_values=self.past, cache_position=torch.arange(self.pos, device=self.device),
                         use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].argmax(-1).tolist()

    @torch.inference_mode()
    def step(self, tokens):
        at = torch.tensor([self.pos], device=self.device)
        out = self.decode(torch.tensor(tokens, device=self.device)[:, None], past_key_values=self.past,
                          cache_position=at, use_cache=True)
        self.pos += 1
        return out.logits[:, -1].argmax(-1).tolist()


def _prefill_warm(runner, ids: list[list[int]], fresh: bool, steps: int = 3) -> list[int]:
    """`runner._prefill(ids)`; on a fresh cache first a few decode steps (compilation, graph
    capture, outside the timed ones) and then the prefill again from an empty cache."""
    first = runner._prefill(ids)
    if not fresh:
        return first
    tokens = first
    for _ in range(steps):
        tokens = runner.step(tokens)
    return runner._prefill(ids)


class LlamaCppRunner:
    """llama.cpp through llama-cpp-python's low-level API: one context, one sequence id per row."""

    def __init__(self, path, dtype: str, quant: str | None, device: str = "cpu", n_ctx: int = 8 * 1024):
        if not str(path).endswith(".gguf"):
            raise ValueError(f"llama.cpp reads .gguf files only, not {Path(path).name!r}")
        try:
            import llama_cpp as ll
        except ImportError:
            raise ImportError("llama-cpp-python is not installed (see benchmarks/README.md)") from None

        self.ll = ll
        ll.llama_backend_init()
        mparams = ll.llama_model_default_params()
        self.lmodel = ll.llama_model_load_from_file(str(path).encode(), mparams)
        cparams = ll.llama_context_default_params()
        cparams.n_ctx, cparams.n_batch, cparams.n_ubatch, cparams.n_seq_max = n_ctx, 4096, 512, 8
        cparams.n_threads = cparams.n_threads_batch = torch.get_num_threads()
        self.ctx = ll.llama_init_from_model(self.lmodel, cparams)
        self.vocab = ll.llama_n_vocab(ll.llama_model_get_vocab(self.lmodel))
        self.pos = []

    def _decode(self, rows: list[list[int]], start: list[int]) -> list[int]:
        ll = self.ll
        n = sum(len(r) for r in rows)
        batch = ll.llama_batch_init(n, 0, len(rows))
        i = 0
        for seq, (row, p0) in enumerate(zip(rows, start)):
            for j, tok in enumerate(row):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, p0 + j, 1
                batch.seq_id[i][0], batch.logits[i] = seq, j == len(row) - 1
                i += 1
        batch.n_tokens = n
        if ll.llama_decode(self.ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        out, i = [], 0
        for row in rows:
            i += len(row)
            out.append(_argmax(ll.llama_get_logits_ith(self.ctx, i - 1), self.vocab))
        ll.llama_batch_free(batch)
        return out

    def prefill(self, ids, extra):
        self.ll.llama_memory_clear(self.ll.llama_get_memory(self.ctx), True)
        self.pos = [len(r) for r in ids]
        return self._decode(ids, [0] * len(ids))

    def step(self, tokens):
        out = self._decode([[t] for t in tokens], self.pos)
        self.pos = [p + 1 for p in self.pos]
        return out


def _argmax(logits, n: int) -> int:
    import numpy as np

    return int(np.ctypeslib.as_array(logits, shape=(n,)).argmax())


RUNNERS = {"qwenkit": QwenkitRunner, "transformers": TransformersRunner, "llama.cpp": LlamaCppRunner}


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read())[1]) * 1024


def run(spec: dict) -> dict:
    """Time prefill, TTFT and decode for one configuration; medians over `repeats`."""
    from .timing import time_config

    t0 = time.perf_counter()
    compiled = spec["peer"] == "transformers" and spec.get("quant") == "compiled"
    cls = TransformersCompiledRunner if compiled else RUNNERS[spec["peer"]]
    runner = cls(spec["path"], spec["dtype"], spec.get("quant"), spec.get("device", "cpu"))
    result = {"load_s": time.perf_counter() - t0}
    result.update(time_config(runner, spec))
    result["peak_rss_bytes"] = peak_rss_bytes()
    if spec["peer"] == "qwenkit":
        from .bounds import flops_per_token, weight_bytes_per_token

        result["weight_bytes_per_token"] = weight_bytes_per_token(runner.model)
        from qwenkit.backends import installed

        if installed(runner.model) == "cuda-graphs":
            result["graph_capture_s"] = runner.decode.capture_s
        result["prefill_flops_per_token"] = flops_per_token(runner.model, spec["prompt_len"] // 2)
    return result


def main() -> None:
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(spec["threads"])  # once per process: a second call can slow MKL down
    try:
        result = run(spec)
    except Exception as e:  # a peer that cannot run is reported with its reason
        result = {"error": f"{type(e).__name__}: {e}"}
    print("BENCH_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
