"""The GPU backend's steps, run on the CPU: everything but the CUDA graph capture itself.

The "cuda-graphs" backend installed on a CPU model runs the very static-buffer steps a GPU
replays (padded batches, masks made on the device, RoPE from a table), eagerly; these tests
prove they give the dynamic path's tokens, and that the in-place paged attention (the Triton
kernel under Triton's CPU interpreter, and its torch form) equals SDPA on the gathered context.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import qwenkit
from qwenkit import backends
from qwenkit.backends.paged_attention import HAS_TRITON, paged_decode_torch
from qwenkit.engine import Engine, EngineSettings, SamplingParams
from test_engine import random_prompts, run_staggered, tiny_model

SLIDING = dict(use_sliding_window=True, sliding_window=6, max_window_layers=1)


def _with_backend(model, name: str):
    backends.install(model, name)
    return model


@pytest.mark.parametrize("overrides", [{}, SLIDING, dict(model_type="qwen3", head_dim=16)])
def test_static_cache_step_gives_the_dynamic_paths_logits(overrides):
    """A batch of 3 on a static cache (as the bench runs it): every decode step's logits through
    the static-buffer step equal the model's own forward, and the cache advances the same."""
    model = tiny_model(seed=2, **overrides)
    prompts = torch.tensor(random_prompts(3, 9, 10, 256, seed=3))  # (3, 9)
    runs = {}
    for name in ("torch", "cuda-graphs"):
        _with_backend(model, name)
        step, cache = backends.decode_step(model), model.new_cache(3, 24)
        logits = [model(prompts, cache=cache, logits_to_keep=1)[:, -1]]
        for _ in range(12):
            logits.append(step(logits[-1].argmax(-1)[:, None], cache=cache, logits_to_keep=1)[:, -1].clone())
        runs[name] = (torch.stack(logits), cache.length)
    assert type(backends.decode_step(model)).__name__ == "GraphedDecode"
    torch.testing.assert_close(runs["cuda-graphs"][0], runs["torch"][0], rtol=1e-4, atol=1e-4)
    assert runs["cuda-graphs"][1] == runs["torch"][1] == 21
    backends.install(model, "torch")


def test_generate_through_the_static_step_gives_the_same_tokens():
    model = tiny_model(seed=4, **SLIDING)
    model.eos_token_ids = []
    prompts = random_prompts(4, 2, 20, 256, seed=6)
    refs = [qwenkit.generate(_with_backend(model, "torch"), p, 16) for p in prompts]
    got = [qwenkit.generate(_with_backend(model, "cuda-graphs"), p, 16) for p in prompts]
    assert got == refs
    backends.install(model, "torch")


@pytest.mark.parametrize("overrides", [{}, SLIDING, dict(model_type="qwen3", head_dim=16)])
def test_engine_with_the_padded_static_step_gives_the_current_engines_tokens(overrides):
    """Continuous batching (staggered arrivals, chunked prefill, preemption, prefix hits) with the
    GPU-shaped decode call gives the current engine's tokens; padding rows wrote to the scratch block."""
    model = tiny_model(seed=5, **overrides)
    model.eos_token_ids = []
    system = random_prompts(1, 8, 9, 256, seed=7)[0]
    prompts = random_prompts(7, 1, 30, 256, seed=1) + random_prompts(5, 1, 20, 256, seed=2, prefix=system)
    settings = EngineSettings(block_size=4, num_blocks=24, max_prefill_tokens=12, max_num_seqs=5)
    got = {}
    for name in ("torch", "cuda-graphs"):
        engine = Engine(_with_backend(model, name), settings)
        got[name] = run_staggered(engine, prompts, SamplingParams(temperature=0, max_tokens=20), arrive_every=2)
        assert engine.metrics()["preemptions"] > 0
    assert got["cuda-graphs"] == got["torch"]
    runner = engine.runner
    assert runner.static is not None and runner.static.padded(3) == 4 and runner.static.padded(300) is None
    scratch = runner.cache.k[:, 24 * 4: 25 * 4]  # the scratch block (block id num_blocks)
    assert scratch.abs().sum() > 0
    backends.install(model, "torch")


def test_the_static_step_is_not_used_where_it_cannot_hold():
    """Dynamic RoPE rescales with the length: no static step; the model's forward runs."""
    model = tiny_model(rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    backends.install(model, "cuda-graphs")
    engine = Engine(model, EngineSettings(block_size=4, num_blocks=16))
    assert engine.runner.static is None
    backends.install(model, "torch")
    assert engine.runner.static is None and backends.installed(model) == "torch"


def _paged_case(seed: int, dtype=torch.float32, bs: int = 4):
    g = torch.Generator().manual_seed(seed)
    B, H, n_kv, D, n_blocks = 4, 6, 2, 32, 20
    k_pool = torch.randn(n_blocks * bs, n_kv, D, generator=g).to(dtype)
    v_pool = torch.randn(n_blocks * bs, n_kv, D, generator=g).to(dtype)
    q = torch.randn(B, H, 1, D, generator=g).to(dtype)
    tables = torch.stack([torch.randperm(n_blocks, generator=g)[:8] for _ in range(B)])  # (B, 8)
    lengths = torch.tensor([1, 7, 16, 23])
    return q, k_pool, v_pool, tables, lengths, bs


def _sdpa_on_gathered(q, k_pool, v_pool, tables, lengths, bs, window):
    """Each row alone: gather its keys [lo, length) into a contiguous tensor and run SDPA."""
    out = []
    for b in range(q.shape[0]):
        n = int(lengths[b])
        lo = max(0, n - window) if window else 0
        slots = torch.tensor([int(tables[b, j // bs]) * bs + j % bs for j in range(lo, n)])
        k, v = k_pool[slots].transpose(0, 1)[None], v_pool[slots].transpose(0, 1)[None]  # (1, n_kv, n, D)
        out.append(F.scaled_dot_product_attention(q[b:b + 1], k, v, enable_gqa=True))
    return torch.cat(out)


@pytest.mark.parametrize("window", [None, 5])
def test_paged_attention_torch_form_equals_sdpa_on_the_gathered_context(window):
    case = _paged_case(0)
    ref = _sdpa_on_gathered(*case, window)
    torch.testing.assert_close(paged_decode_torch(*case, window), ref, rtol=1e-5, atol=1e-5)


KERNEL_CHECK = """
import torch, sys
sys.path.insert(0, {tests!r})
from test_cuda_backend import _paged_case, _sdpa_on_gathered
from qwenkit.backends.paged_attention import paged_decode
for dtype, tol, bs in ((torch.float32, 1e-5, 4), (torch.float32, 1e-5, 3), (torch.bfloat16, 2e-2, 4)):
    for window in (None, 5, 100):
        case = _paged_case(1, dtype, bs)
        ref = _sdpa_on_gathered(*[t.float() if torch.is_tensor(t) and t.is_floating_point() else t for t in case], window)
        got = paged_decode(*case, window).float()
        assert got.shape == ref.shape, (got.shape, ref.shape)
        err = (got - ref).abs().max().item()
        assert err < tol, (dtype, window, err)
print("kernel ok")
"""


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (pip install triton); the torch form is tested above")
def test_paged_attention_kernel_equals_sdpa_on_the_gathered_context():
    """The Triton kernel itself, run by Triton's CPU interpreter (set before Triton is imported,
    hence a fresh process), in fp32 and bf16, blocks of 4 and of 3 slots (a tile spans several),
    with and without a sliding window."""
    tests = str(Path(__file__).parent)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", KERNEL_CHECK.format(tests=tests)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "kernel ok" in proc.stdout, proc.stderr[-2000:]


def test_gpu_kv_budget_leaves_room_for_the_engines_own_calls():
    """On a GPU the KV share is taken of free memory less the calls' activations: a full batch's
    float32 logits at least, growing with max_num_seqs and the prefill chunk."""
    from qwenkit.engine.memory import activation_reserve, free_for_kv

    model = tiny_model()
    small, wide = EngineSettings(max_num_seqs=8), EngineSettings(max_num_seqs=256)
    assert activation_reserve(model, wide) - activation_reserve(model, small) >= 248 * 256 * 4
    longer = EngineSettings(max_num_seqs=8, max_prefill_tokens=4096)
    assert activation_reserve(model, longer) > activation_reserve(model, small)
    assert free_for_kv(model, small) > 0  # on the CPU: available RAM, nothing taken off


def test_bench_runners_reuse_their_caches_and_the_static_cache_peer_matches_eager(tmp_path):
    """The qwenkit runner (cuda-graphs step, one reused cache per shape) and transformers with its
    static cache (the compiled peer's calls, run eagerly here) give eager transformers' tokens."""
    from qwenkit.bench.runners import QwenkitRunner, TransformersCompiledRunner, TransformersRunner
    from tiny import make_checkpoint

    path = make_checkpoint(tmp_path / "ckpt", "qwen2")
    ids = random_prompts(2, 7, 8, 256, seed=9)
    got = {}
    qk = QwenkitRunner(path, "float32", None)
    backends.install(qk.model, "cuda-graphs")
    qk.decode = backends.decode_step(qk.model)
    for name, runner in (("eager", TransformersRunner(path, "float32", None)), ("qwenkit", qk),
                         ("static", TransformersCompiledRunner(path, "float32", None, compile=False))):
        runs = []
        for _ in range(2):  # the second run reuses the first's cache
            tokens = [runner.prefill(ids, 8)]
            for _ in range(6):
                tokens.append(runner.step(tokens[-1]))
            runs.append(tokens)
        assert runs[0] == runs[1], name
        got[name] = runs[0]
    assert got["qwenkit"] == got["eager"] and got["static"] == got["eager"]
    assert len(qk.caches) == 1


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_prefill_on_a_dense_copy_equals_the_packed_kernels(scheme):
    """The CUDA forms of int8 / int4 layers (run here on a bf16 CPU model, whose int4 layout is
    torch's): many rows multiply a dense copy of W made once, equal to the packed kernel's
    product; a few rows still go to the packed kernel."""
    from qwenkit.backends.cuda import quant_form
    from qwenkit.backends.quant import quantize

    model = quantize(tiny_model().to(torch.bfloat16), scheme)
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(40, layer.in_features, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    packed = layer(x).float()
    cls = quant_form(layer)
    assert cls is not None
    layer.__class__ = cls  # what backends.install does on a CUDA model
    dense = layer(x).float()
    assert "_dense" in layer.__dict__ and layer.__dict__["_dense"].shape == (layer.out_features, layer.in_features)
    torch.testing.assert_close(dense, packed, rtol=2e-2, atol=2e-2 * packed.abs().max().item())
    torch.testing.assert_close(layer(x[:3]).float(), packed[:3], rtol=0, atol=0)


ENGINE_IN_PLACE = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_cuda_backend import SLIDING, _with_backend
from test_engine import random_prompts, run_staggered, tiny_model
from qwenkit.backends import cuda
from qwenkit.engine import Engine, EngineSettings, SamplingParams
model = tiny_model(seed=5, **SLIDING)
model.eos_token_ids = []
prompts = random_prompts(4, 1, 14, 256, seed=1)
settings = EngineSettings(block_size=4, num_blocks=24, max_prefill_tokens=8, max_num_seqs=3)
params = SamplingParams(temperature=0, max_tokens=6)
ref = run_staggered(Engine(_with_backend(model, "torch"), settings), prompts, params)
_with_backend(model, "cuda-graphs")
cuda.swap_attention(model)  # what install does on a CUDA model with Triton
engine = Engine(model, settings)
assert engine.runner.static.in_place
assert run_staggered(engine, prompts, params) == ref
print("engine in place ok")
"""


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (pip install triton); the gather form is tested above")
def test_engine_with_the_in_place_kernel_gives_the_current_engines_tokens():
    """The GPU engine's decode as a CUDA model runs it (padded static step, attention by the Triton
    kernel straight from the pool, no gathered slots, no masks), under Triton's CPU interpreter."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", ENGINE_IN_PLACE.format(tests=str(Path(__file__).parent))],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "engine in place ok" in proc.stdout, proc.stderr[-2000:]
