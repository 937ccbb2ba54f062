"""Backends are chosen once, from the model and the host, and installed from outside; `--dtype
auto` loads the fastest correct form. Where a test asks what another kind of host would get, it
replaces the host's answers (`cpu_kernels.kernels`, `native_bf16`); everything else runs for real."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import qwenkit
from qwenkit import backends
from qwenkit.backends import cpu_kernels, host, quant
from qwenkit.backends.cpu import CpuLinear, CpuRMSNorm, CpuSDPA
from qwenkit.backends.fused_decode import FusedDecode
from qwenkit.model.attention import SDPA
from qwenkit.weights import open_checkpoint
from tiny import make_checkpoint

KERNELS = cpu_kernels.kernels() is not None
needs_kernels = pytest.mark.skipif(not KERNELS, reason=f"no CPU kernels here: {cpu_kernels.why_unavailable()}")


@pytest.mark.parametrize("kernels", [True, False])
@pytest.mark.parametrize("native", [True, False])
def test_auto_plan_on_every_kind_of_host(kernels, native, monkeypatch):
    """With the C kernels: fp32 activations, weights no more precise than the file's (int8 for a
    quantized GGUF, bf16 for bf16/fp16 files); without them torch's kernels, bf16 only where the
    CPU multiplies it natively; a GPU gets bf16."""
    monkeypatch.setattr(cpu_kernels, "kernels", (lambda: object()) if kernels else (lambda: None))
    monkeypatch.setattr(backends, "native_bf16", lambda: native)
    for stored in ("quantized", "bfloat16", "float16", "float32"):
        dtype, scheme = backends.auto_plan("cpu", stored)
        if kernels:
            assert dtype == torch.float32
            assert scheme == {"quantized": "int8", "bfloat16": "bf16", "float16": "bf16"}.get(stored)
        else:
            assert (dtype, scheme) == (torch.bfloat16 if native else torch.float32, None)
    assert backends.auto_plan("cuda", "quantized") == (torch.bfloat16, None)


def test_prefill_gemm_dtype_follows_the_host():
    assert quant.PREFILL_DTYPE == (torch.bfloat16 if host.native_bf16() else torch.float32)
    assert host.native_bf16() == bool({"AVX512-BF16", "AMX"} & set(host.cpu_features()))
    assert host.features().startswith("CPU ")


def test_backend_follows_the_models_dtype_and_the_host(tmp_path, monkeypatch):
    """fp32 on a CPU with the kernels: every module in its CPU form and the fused step; bf16: the
    attention op only; installing "torch" puts the model's own modules back, with the same
    parameters and logits; without the kernels every model gets plain torch."""
    path = make_checkpoint(tmp_path / "ckpt", "qwen3")
    model = qwenkit.load_model(path, dtype=torch.float32)
    attn = model.model.layers[0].self_attn
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fast = model(ids)
    if KERNELS:
        assert backends.installed(model) == "cpu-kernels"
        assert type(attn.qkv_proj) is CpuLinear and type(attn.q_norm) is CpuRMSNorm and type(attn.sdpa) is CpuSDPA
        assert isinstance(backends.decode_step(model), FusedDecode)
    weight = attn.qkv_proj.weight
    backends.install(model, "torch")
    attn = model.model.layers[0].self_attn
    assert backends.installed(model) == "torch" and backends.decode_step(model) is model
    assert all(type(m).__module__.startswith(("qwenkit.model", "torch.nn")) for m in model.modules())
    assert attn.qkv_proj.weight is weight
    with torch.no_grad():
        torch.testing.assert_close(model(ids), fast, atol=1e-4, rtol=1e-4)
    bf16 = qwenkit.load_model(path, dtype=torch.bfloat16)
    assert backends.installed(bf16) == ("cpu-attention" if KERNELS else "torch")
    assert type(bf16.model.layers[0].self_attn.sdpa) is (CpuSDPA if KERNELS else SDPA)
    assert type(bf16.model.layers[0].self_attn.qkv_proj) is torch.nn.Linear
    monkeypatch.setattr(cpu_kernels, "kernels", lambda: None)
    assert backends.choose(model) == backends.choose(bf16) == "torch"
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        backends.install(model, "tpu")


def _bf16_checkpoint(path):
    """The tiny checkpoint's matrices stored in bf16, as published checkpoints are."""
    file = path / "model.safetensors"
    save_file({k: v.bfloat16() for k, v in load_file(file).items()}, file, metadata={"format": "pt"})
    return path


@needs_kernels
def test_auto_keeps_bf16_weights_in_bf16_under_fp32_arithmetic(tmp_path):
    path = _bf16_checkpoint(make_checkpoint(tmp_path / "ckpt", "qwen2"))
    auto = qwenkit.load_model(path)
    exact = qwenkit.load_model(path, dtype=torch.float32)
    assert auto.dtype == torch.float32 and type(auto.model.layers[0].mlp.down_proj) is quant.Bf16Linear
    prompt = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1)).tolist()[0]
    assert qwenkit.generate(auto, prompt, 12) == qwenkit.generate(exact, prompt, 12)


@needs_kernels
def test_auto_loads_a_quantized_gguf_as_int8(tmp_path):
    """A 4-8 bit GGUF loads as int8 weights under fp32 arithmetic and decodes through the fused
    step, near the dequantized file (int8 per channel on a tiny random model: a few percent; the
    default model's quality is held to +2% perplexity below)."""
    from gguf import GGMLQuantizationType as Q
    from test_weights_gguf import LAYERS, dense_arrays, dense_ffn, write_gguf

    arrays = dense_arrays(np.random.default_rng(0)) | dense_ffn(np.random.default_rng(1))
    qtypes = {name: Q.Q8_0 for name, a in arrays.items() if a.ndim == 2 and a.shape[1] % 32 == 0}
    path = tmp_path / "tiny.gguf"
    write_gguf(path, "qwen2", arrays, qtypes)
    assert open_checkpoint(path).stored == "quantized"
    auto = qwenkit.load_model(path)
    exact = qwenkit.load_model(path, dtype=torch.float32)
    assert auto.dtype == torch.float32 and type(auto.model.layers[LAYERS - 1].self_attn.o_proj) is quant.Int8Linear
    assert isinstance(backends.decode_step(auto), FusedDecode)
    ids = torch.randint(0, 32, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got, want = auto(ids), exact(ids)
    assert float((got - want).norm() / want.norm()) < 0.08


@needs_kernels
@pytest.mark.slow
def test_the_default_model_loads_in_its_fastest_correct_form(default_model_path):
    """`load_model(default)` (what `make chat` runs): int8 weights under fp32 arithmetic, the fused
    decode step, perplexity within 2% of the dequantized file in fp32, the right one-word answer."""
    from test_quant import TEXT, _perplexity

    tok = qwenkit.load_tokenizer(default_model_path)
    auto = qwenkit.load_model(default_model_path)
    assert type(auto.lm_head) is quant.Int8Linear and isinstance(backends.decode_step(auto), FusedDecode)
    question = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France? Answer in one word."}], tokenize=True)
    assert tok.decode(qwenkit.generate(auto, question, 8), skip_special_tokens=True).strip() == "Paris"
    ids = tok.encode(TEXT)
    auto_ppl = _perplexity(auto, ids)
    del auto
    assert auto_ppl <= _perplexity(qwenkit.load_model(default_model_path, dtype=torch.float32), ids) * 1.02
