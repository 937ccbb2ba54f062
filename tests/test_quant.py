"""Weight-only int8 / int4 quantization: kernels against a dequantized reference, and the default
model's quality held (perplexity within 2% / 8% of bf16; int8 keeps the greedy answer)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import qwenkit
from qwenkit.model.quant import Int4Linear, Int8Linear, quantize

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


@pytest.mark.parametrize("cls,tol", [(Int8Linear, 0.02), (Int4Linear, 0.12)])
def test_quantized_linear_matches_float(cls, tol):
    torch.manual_seed(0)
    linear = nn.Linear(256, 96, bias=True).to(torch.bfloat16)
    q = cls(linear)
    x = torch.randn(3, 5, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = linear(x).float()
        got = q(x).float()
    assert got.shape == ref.shape
    assert float((got - ref).abs().max() / ref.abs().max()) < tol


def _perplexity(model, ids: list[int]) -> float:
    with torch.inference_mode():
        logits = model(torch.tensor([ids]))[0, :-1]
    return math.exp(float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]))))


@pytest.mark.slow
def test_default_model_quality_holds_under_int8_and_int4(default_model_path):
    tok = qwenkit.load_tokenizer(default_model_path)
    ids = tok.encode(TEXT)
    question = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France? Answer in one word."}], tokenize=True)
    ppl, answers = {}, {}
    for scheme in ("bf16", "int8", "int4"):
        model = qwenkit.load_model(default_model_path)
        if scheme != "bf16":
            quantize(model, scheme)
        ppl[scheme] = _perplexity(model, ids)
        answers[scheme] = tok.decode(qwenkit.generate(model, question, 8), skip_special_tokens=True).strip()
        del model
    print(f"perplexity over {len(ids)} tokens: {ppl}; answers: {answers}")
    assert ppl["int8"] <= ppl["bf16"] * 1.02
    assert ppl["int4"] <= ppl["bf16"] * 1.08
    assert answers["int8"] == answers["bf16"] == "Paris"
