"""Weight-only int8 / int4 / bf16 layers: kernels against a dequantized reference, and the default
model's quality held (perplexity within 2% / 8% / 1% of the unquantized model; int8 and bf16 keep the
greedy answer)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

import qwenkit
from qwenkit.backends.quant import Bf16Linear, Int4Linear, Int8Linear, QuantEmbedding, quantize

TEXT = """The river ran low that summer, and the children of the village walked its dry bed looking for
stones that shone. Their grandmother said the water would come back with the autumn rains, as it always
had, and that a river is only resting when it seems to be gone. In the evenings she told them how the
bridge was built, one stone at a time, by people who never saw it finished.

def merge_sorted(a, b):
    \"\"\"Merge two sorted lists into one sorted list.\"\"\"
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        if a[i] <= b[j]:
            out.append(a[i]); i += 1
        else:
            out.append(b[j]); j += 1
    return out + a[i:] + b[j:]

Photosynthesis turns light, water and carbon dioxide into sugar and oxygen. The light reactions happen
in the thylakoid membranes, where chlorophyll absorbs photons and splits water; the Calvin cycle then
fixes carbon in the stroma."""


@pytest.mark.parametrize("rows", [1, 6, 16, 40])  # fp32: <= 16 rows take qwenkit's GEMV, more the GEMM
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("cls,tol", [(Int8Linear, 0.02), (Int4Linear, 0.12), (Bf16Linear, 0.01)])
def test_quantized_linear_matches_float(cls, tol, dtype, rows):
    torch.manual_seed(0)
    linear = nn.Linear(256, 112, bias=True).to(dtype)
    q = cls(linear)
    x = torch.randn(rows, 1, 256, dtype=dtype)
    with torch.no_grad():
        ref = linear(x).float()
        got = q(x).float()
    assert got.shape == ref.shape and q(x).dtype == dtype
    assert float((got - ref).abs().max() / ref.abs().max()) < tol


def _q8_blocks(x: torch.Tensor) -> torch.Tensor:
    """x (M, K) quantized to int8 in blocks of 32 along K (the last may be short) and back, as the
    int8/int4 kernels see it: scale = amax / 127, round to nearest even."""
    out = torch.empty_like(x)
    for k in range(0, x.shape[1], 32):
        b = x[:, k:k + 32]
        amax = b.abs().amax(1, keepdim=True)
        q = torch.round(b * torch.where(amax > 0, 127.0 / amax, 0.0))
        out[:, k:k + 32] = q * (amax / 127.0)
    return out


def test_cpu_gemv_kernels_equal_the_dequantized_product():
    """qwenkit's C kernels against x_q8 @ W_dequantized^T, to fp32 rounding, on odd shapes (an odd
    number of blocks of 32, a short last block, every row count 1..16); x_q8 is x through int8
    blocks of 32, which differs from x by at most half a step of its block."""
    from qwenkit.backends import cpu_kernels

    if cpu_kernels.kernels() is None:
        pytest.skip(f"no CPU kernels here: {cpu_kernels.why_unavailable()}")
    torch.manual_seed(0)
    for K in (96, 200, 256):
        bias = torch.randn(37)
        q8 = Int8Linear(nn.Linear(K, 37)).requires_grad_(False)
        deq8 = q8.weight.float() * q8.scales[:, None]
        assert torch.equal(q8.dequantized(), deq8)  # the C dequantization prefill uses
        for m in range(1, 17):
            x = torch.randn(m, K)
            got = cpu_kernels.int8_gemv(x, q8.weight, q8.scales, bias)
            assert torch.allclose(got, _q8_blocks(x) @ deq8.T + bias, atol=1e-4, rtol=1e-4)
    q4 = Int4Linear(nn.Linear(96, 37)).requires_grad_(False)
    assert q4.own_layout and q4.qweight.shape == (5, 384)  # 37 rows padded to 5 blocks of 8, 4 bytes per input
    q, s, mn = torch.randint(0, 16, (13, 64)), torch.randn(13, 2).half(), torch.randn(13, 2).half()
    for got, want in zip(cpu_kernels.unpack_int4(*cpu_kernels.pack_int4(q, s, mn), 13), (q.to(torch.uint8), s, mn)):
        assert torch.equal(got, want)
    groups, scales, mins = cpu_kernels.unpack_int4(q4.qweight, q4.scales, q4.mins, 37)
    assert scales.dtype == mins.dtype == torch.float16 and scales.shape == (37, 3)
    deq4 = (groups.float().reshape(37, 3, 32) * scales.float()[..., None] + mins.float()[..., None]).reshape(37, 96)
    assert torch.allclose(q4.dequantized(), deq4, atol=1e-6)
    mins = mins.float().repeat_interleave(32, dim=1)
    bias = torch.randn(37)
    for m in range(1, 17):
        x = torch.randn(m, 96)
        x[0, :32] = 0.0  # an all-zero block quantizes to zeros, not NaN
        got = cpu_kernels.int4_gemv(x, q4.qweight, q4.scales, q4.mins, bias, 37)
        # the minimum term multiplies the exact block sums of x, the rest its int8 blocks
        want = _q8_blocks(x) @ (deq4 - mins).T + x @ mins.T + bias
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
        assert not got.isnan().any()
    for K, dtype in itertools.product((96, 100, 200), (torch.bfloat16, torch.float32)):
        w = torch.randn(37, K).to(dtype)  # bf16 weights are widened in registers: x @ W.float()^T to fp32 rounding
        for m in range(1, 17):
            x = torch.randn(m, K)
            assert torch.allclose(cpu_kernels.f32_gemv(x, w, bias), x @ w.float().T + bias, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="1 to 16 rows"):
        cpu_kernels.int8_gemv(torch.randn(17, 96), q8.weight[:, :96].contiguous(), q8.scales, None)


def _perplexity(model, ids: list[int], chunk: int | None = None) -> float:
    """Over one forward of `ids`, or (chunk) over pieces of that many tokens through a KV cache,
    which sends them down the decode GEMVs (<= 16 rows) instead of prefill's GEMM."""
    with torch.inference_mode():
        if chunk is None:
            logits = model(torch.tensor([ids]))[0, :-1]
        else:
            cache = model.new_cache(1, len(ids))
            logits = torch.cat([model(torch.tensor([ids[i:i + chunk]]), cache=cache)[0]
                                for i in range(0, len(ids), chunk)])[:-1]
    return math.exp(float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]))))


@pytest.mark.slow
def test_default_model_quality_holds_under_int8_and_int4(default_model_path):
    """bf16 runs torch's int8/int4 kernels; fp32 runs qwenkit's own CPU GEMVs (decode) and the
    dequantized GEMM (prefill). Each is held to its own unquantized dtype."""
    tok = qwenkit.load_tokenizer(default_model_path)
    ids = tok.encode(TEXT)
    question = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France? Answer in one word."}], tokenize=True)
    ppl, answers = {}, {}
    for dtype in (torch.bfloat16, torch.float32):
        for scheme in ("none", "int8", "int4") + (("bf16",) if dtype == torch.float32 else ()):
            model = qwenkit.load_model(default_model_path, dtype=dtype)
            if scheme != "none":
                quantize(model, scheme)
            key = (str(dtype).removeprefix("torch."), scheme)
            ppl[key] = _perplexity(model, ids)
            if dtype == torch.float32:  # qwenkit's int8/int4 GEMVs, which also quantize x
                ppl[key + ("decode",)] = _perplexity(model, ids, chunk=16)
            answers[key] = tok.decode(qwenkit.generate(model, question, 8), skip_special_tokens=True).strip()
            del model
    print(f"perplexity over {len(ids)} tokens: {ppl}; answers: {answers}")
    for dt in ("bfloat16", "float32"):
        assert ppl[dt, "int8"] <= ppl[dt, "none"] * 1.02
        assert ppl[dt, "int4"] <= ppl[dt, "none"] * 1.08
        assert answers[dt, "int8"] == answers[dt, "none"] == "Paris"
    assert ppl["float32", "int8", "decode"] <= ppl["float32", "none", "decode"] * 1.02
    assert ppl["float32", "int4", "decode"] <= ppl["float32", "none", "decode"] * 1.08
    assert ppl["float32", "none", "decode"] == pytest.approx(ppl["float32", "none"], rel=1e-3)
    # bf16 weights under fp32 arithmetic: bf16's rounding of the weights only
    assert ppl["float32", "bf16"] == pytest.approx(ppl["float32", "none"], rel=0.01)
    assert ppl["float32", "bf16", "decode"] == pytest.approx(ppl["float32", "none"], rel=0.01)
    assert answers["float32", "bf16"] == "Paris"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_embedding_rows(dtype):
    """int8 rows with a scale per token (to half a step of each row's scale), bf16 rows (bf16's
    rounding); a lookup returns the model's dtype, in the ids' shape."""
    torch.manual_seed(0)
    emb = nn.Embedding(300, 64).to(dtype).requires_grad_(False)
    ids = torch.tensor([[0, 5, 299], [7, 7, 1]])
    want = emb(ids).float()
    q8, b16 = QuantEmbedding(emb, "int8"), QuantEmbedding(emb, "bf16")
    assert q8.weight.dtype == torch.int8 and b16.weight.dtype == torch.bfloat16
    step = emb.weight.float().abs().amax(1)[ids, None] / 127
    rounding = want.abs() / 256 if dtype == torch.bfloat16 else 1e-6  # of the product in the model's dtype
    for got, tol in ((q8(ids), step / 2 + rounding), (b16(ids), want.abs() / 256)):
        assert got.dtype == dtype and got.shape == (2, 3, 64)
        assert ((got.float() - want).abs() <= tol).all()


def test_cpu_linear_uses_the_fp32_gemv_for_a_few_rows_and_keeps_autograd():
    """The CPU backend's Linear: 2-8 fp32 rows without autograd go through the CPU GEMV and equal
    F.linear to fp32 rounding; with autograd on it is torch's op (gradients flow)."""
    from qwenkit.backends import cpu_kernels
    from qwenkit.backends.cpu import CpuLinear

    if cpu_kernels.kernels() is None:
        pytest.skip(f"the CPU backend is not installed without its kernels: {cpu_kernels.why_unavailable()}")
    torch.manual_seed(0)
    lin = CpuLinear(200, 75, bias=True)
    for rows in range(1, 11):
        x = torch.randn(rows, 1, 200)
        with torch.no_grad():
            assert torch.allclose(lin(x), nn.functional.linear(x, lin.weight, lin.bias), atol=1e-5, rtol=1e-5)
    x = torch.randn(4, 200)
    with torch.no_grad():
        assert torch.equal(lin(x), cpu_kernels.f32_gemv(x, lin.weight, lin.bias))
    y = lin(torch.randn(4, 200, requires_grad=True))
    y.sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.shape == (75, 200)


@pytest.mark.parametrize("arch", ["qwen2", "qwen2-tied"])
@pytest.mark.parametrize("scheme", ["int8", "int4", "bf16"])
def test_quantize_on_load_equals_quantize_after_load(tmp_path, arch, scheme):
    """load_model(quantize=...) swaps each layer as its weights arrive (the tied LM head at the
    end) and gives exactly the model that quantize() makes from the full-precision load."""
    from tiny import make_checkpoint

    path = make_checkpoint(tmp_path / arch, arch)
    ids = torch.tensor([[3, 17, 99, 5, 42]])
    after = quantize(qwenkit.load_model(path, dtype=torch.float32), scheme)
    on_load = qwenkit.load_model(path, dtype=torch.float32, quantize=scheme)
    kinds = {type(m).__name__ for m in on_load.modules()}
    assert "Linear" not in kinds and {"int8": "Int8Linear", "int4": "Int4Linear", "bf16": "Bf16Linear"}[scheme] in kinds
    assert "Embedding" not in kinds and "QuantEmbedding" in kinds
    if arch == "qwen2-tied" and scheme == "int8":  # one int8 table for the tied head and embedding
        assert on_load.model.embed_tokens.weight is on_load.lm_head.weight
        assert after.model.embed_tokens.weight is after.lm_head.weight
    assert on_load.quantization == scheme
    with torch.inference_mode():
        assert torch.equal(on_load(ids), after(ids))
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        qwenkit.load_model(path, quantize="int3")


def test_dequantized_weights_in_bf16_are_the_fp32_ones_rounded():
    """The C dequantization writes bf16 directly (for the bf16 prefill GEMM): the same values as
    dequantizing to fp32 and rounding to nearest even, tails of rows included."""
    from qwenkit.backends import cpu_kernels

    if cpu_kernels.kernels() is None:
        pytest.skip(f"no CPU kernels here: {cpu_kernels.why_unavailable()}")
    torch.manual_seed(0)
    for K in (100, 128):
        q8 = Int8Linear(nn.Linear(K, 37))
        assert torch.equal(q8.dequantized(torch.bfloat16), q8.dequantized().to(torch.bfloat16))
    q4 = Int4Linear(nn.Linear(96, 37))
    assert torch.equal(q4.dequantized(torch.bfloat16), q4.dequantized().to(torch.bfloat16))


@pytest.mark.parametrize("scheme", ["int8", "int4", "bf16"])
def test_prefill_through_the_bf16_gemm_stays_near_the_fp32_gemm(scheme, monkeypatch):
    """Prefill (more rows than the GEMVs take) multiplies the weights in bf16 where the CPU does
    so natively (`PREFILL_DTYPE`); forced here on any host, it stays within bf16's rounding of the
    fp32 GEMM's result."""
    from qwenkit.backends import quant

    torch.manual_seed(0)
    lin = nn.Linear(128, 48, bias=True)
    layer = {"int8": Int8Linear, "int4": Int4Linear, "bf16": Bf16Linear}[scheme](lin)
    x = torch.randn(40, 128)
    with torch.no_grad():
        monkeypatch.setattr(quant, "PREFILL_DTYPE", torch.float32)
        fp32 = layer(x)
        monkeypatch.setattr(quant, "PREFILL_DTYPE", torch.bfloat16)
        bf16 = layer(x)
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, fp32)
    torch.testing.assert_close(bf16, fp32, atol=0.02 * float(fp32.abs().max()), rtol=0.02)
