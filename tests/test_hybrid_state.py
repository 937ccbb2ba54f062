"""The Gated DeltaNet's two forms and its recurrent state: chunked == recurrent, states carried
across calls, float32 state under bf16, the cache's limits, and what the engine says of hybrids."""

from __future__ import annotations

import pytest
import torch

import qwenkit
from hybrid_tiny import make_hybrid
from qwenkit.errors import ConfigError
from qwenkit.model.deltanet import delta_rule_chunked, delta_rule_recurrent, l2_normalize


def _inputs(T: int, seed: int, decay: float, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    B, h, dk, dv = 2, 3, 8, 12
    q = l2_normalize(torch.randn(B, h, T, dk, generator=gen)) * dk**-0.5
    k = l2_normalize(torch.randn(B, h, T, dk, generator=gen))
    v = torch.randn(B, h, T, dv, generator=gen) * 3
    g = -torch.rand(B, h, T, generator=gen) * decay
    beta = torch.rand(B, h, T, generator=gen)
    state = torch.randn(B, h, dk, dv, generator=gen)
    return [x.to(dtype) for x in (q, k, v, g, beta, state)]


@pytest.mark.parametrize("T,decay", [(1, 1.0), (63, 0.1), (150, 1.0), (200, 20.0)])
def test_chunked_form_equals_recurrent_form(T, decay):
    q, k, v, g, beta, state = _inputs(T, seed=T, decay=decay)
    out_r, state_r = delta_rule_recurrent(q, k, v, g, beta, state)
    out_c, state_c = delta_rule_chunked(q, k, v, g, beta, state)
    assert torch.allclose(out_c, out_r, atol=1e-10) and torch.allclose(state_c, state_r, atol=1e-10)
    # float32, as the model runs it: within rounding of the float64 truth, also under strong decay
    f32 = [x.float() for x in (q, k, v, g, beta, state)]
    out32, state32 = delta_rule_chunked(*f32)
    assert (out32.double() - out_r).abs().max() < 1e-5 and (state32.double() - state_r).abs().max() < 1e-5


def test_state_carried_across_calls_equals_one_call():
    q, k, v, g, beta, state = _inputs(100, seed=7, decay=2.0)
    whole, final = delta_rule_chunked(q, k, v, g, beta, state)
    outs, s = [], state
    for i in range(0, 100, 13):  # chunked calls, then single tokens through the recurrent form
        rule = delta_rule_recurrent if i >= 78 else delta_rule_chunked
        out, s = rule(q[:, :, i:i + 13], k[:, :, i:i + 13], v[:, :, i:i + 13], g[:, :, i:i + 13], beta[:, :, i:i + 13], s)
        outs.append(out)
    assert torch.allclose(torch.cat(outs, 2), whole, atol=1e-10) and torch.allclose(s, final, atol=1e-10)


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    return make_hybrid(tmp_path_factory.mktemp("h") / "ckpt", "qwen3_5_text")


def test_cache_keeps_kv_only_for_attention_layers_and_float32_state_under_bf16(hybrid):
    model = qwenkit.load_model(hybrid, dtype=torch.bfloat16)
    cache = model.new_cache(2, 32)
    assert cache.kv.k.shape[0] == len(model.config.attention_layers) == 1
    assert cache.state[0].dtype == torch.float32 and cache.conv[0].dtype == torch.bfloat16
    with torch.no_grad():
        model(torch.randint(0, 256, (2, 9)), cache=cache)
    assert cache.length == 9 and cache.state[0].abs().sum() > 0
    cache.trim(0)
    with pytest.raises(NotImplementedError, match="recurrent state"):
        cache.trim(1)


def test_load_model_auto_dtype_runs_plain_modules_and_generates(hybrid):
    from qwenkit import backends

    model = qwenkit.load_model(hybrid)  # dtype auto, on the CPU
    assert backends.choose(model) == "torch" and backends.decode_step(model) is model
    expected = qwenkit.generate(qwenkit.load_model(hybrid, dtype=torch.float32), [1, 2, 3], 8)
    assert len(qwenkit.generate(model, [1, 2, 3], 8)) == 8
    if model.dtype == torch.float32:
        assert qwenkit.generate(model, [1, 2, 3], 8) == expected


def test_engine_refuses_deterministic_mode_on_a_hybrid_with_one_clear_error(hybrid):
    from qwenkit.engine import Engine, EngineSettings

    model = qwenkit.load_model(hybrid, dtype=torch.float32)
    with pytest.raises(ConfigError, match="does not run deterministic mode .* on hybrid models .*qwen3_5_text.* yet"):
        Engine(model, EngineSettings(deterministic=True))
