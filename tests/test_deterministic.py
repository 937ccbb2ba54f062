"""Deterministic serving (`EngineSettings(deterministic=True)`, `qwenkit serve --deterministic`):
a request's tokens and logprobs, bit for bit, whatever it is batched with - 16 concurrent
requests against the same 16 sent one at a time - on each kernel path the engine runs (torch's
fp32 and bf16 GEMMs, qwenkit's int8 GEMVs), greedy and seeded sampling, with preemption, and a
repeated seeded request (which would hit the prefix cache) giving the same text."""

from __future__ import annotations

import pytest
import torch

from qwenkit import backends
from qwenkit.backends import cpu_kernels, quant
from qwenkit.backends.host import native_bf16
from qwenkit.engine import LLM, EngineSettings, SamplingParams
from test_engine import random_prompts, tiny_model

SETTINGS = dict(block_size=16, max_prefill_tokens=16, max_num_seqs=16, deterministic=True)
NEEDS_KERNELS = pytest.mark.skipif(cpu_kernels.kernels() is None, reason="qwenkit's C kernels did not build here")


def wide_model(dtype=torch.float32, scheme=None):
    """Wide enough (hidden 256) that a different summation order shows in the logits' last bits."""
    model = tiny_model(vocab_size=512, seed=3, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                       num_attention_heads=8, num_key_value_heads=2).to(dtype)
    if scheme:
        quant.quantize(model, scheme)
    model.eos_token_ids = []
    return backends.install(model)


def runs(model, params, num_blocks=100, n=16, preempts=False):
    """(outputs alone, outputs all at once) as (token ids, logprobs) per prompt."""
    prompts = random_prompts(n, 1, 60, model.config.vocab_size, seed=11)
    settings = EngineSettings(num_blocks=num_blocks, **SETTINGS)

    def key(o):
        return o.token_ids, [lp for lp in o.logprobs]

    alone = [key(LLM(model, settings=settings).generate([p], params)[0]) for p in prompts]
    llm = LLM(model, settings=settings)
    together = [key(o) for o in llm.generate(prompts, params)]
    assert (llm.engine.metrics()["preemptions"] > 0) == preempts
    return alone, together


PATHS = {
    "fp32 torch": lambda: wide_model(),
    "bf16 torch": lambda: wide_model(torch.bfloat16),
    "int8 C GEMV": lambda: wide_model(scheme="int8"),
}


@pytest.mark.parametrize("path", PATHS)
def test_concurrent_equals_alone_greedy_and_seeded(path):
    if path != "fp32 torch" and cpu_kernels.kernels() is None:
        pytest.skip("qwenkit's C kernels did not build here")
    if path == "bf16 torch" and not native_bf16():
        pytest.skip("no native bf16 on this CPU: bf16 GEMMs run a slow emulation (the fp32 cases still run)")
    model = PATHS[path]()
    greedy = SamplingParams(temperature=0, max_tokens=12, logprobs=0)
    seeded = SamplingParams(temperature=0.9, top_k=40, top_p=0.9, seed=5, max_tokens=12, logprobs=0)
    for params in (greedy, seeded) if path == "int8 C GEMV" else (greedy,):  # sampling is per row on every path
        alone, together = runs(model, params)
        assert together == alone, path


@NEEDS_KERNELS
def test_int8_decode_rows_share_calls():
    """The int8 path keeps batching its decode rows (no per-row cost); torch's GEMMs do not."""
    assert backends.batch_invariant_rows(wide_model(scheme="int8")) == cpu_kernels.MAX_ROWS
    assert backends.batch_invariant_rows(wide_model()) == 1


def test_preemption_keeps_every_request_equal_to_alone():
    model = wide_model()
    params = SamplingParams(temperature=0, max_tokens=16, logprobs=0)
    alone, together = runs(model, params, num_blocks=14, preempts=True)  # too few blocks for 16 at once
    assert together == alone


def test_seeded_request_repeats_exactly_with_the_cache_holding_its_prompt():
    model = wide_model()
    llm = LLM(model, settings=EngineSettings(num_blocks=100, **SETTINGS))
    prompt = random_prompts(1, 40, 41, 512, seed=2)[0]
    params = SamplingParams(temperature=1.0, seed=9, max_tokens=10, logprobs=0)
    first, second = (llm.generate([prompt], params)[0] for _ in range(2))
    assert (first.token_ids, first.logprobs) == (second.token_ids, second.logprobs)
    assert llm.engine.metrics()["prefix_cache_hit_tokens"] == 0  # off under deterministic
