"""Structured outputs on the default model (Qwen2.5-Coder-0.5B-Instruct): greedy extraction
through `LLM.generate` held to a strict JSON schema gives the facts of the text, as JSON that
parses and fits the schema, where the same model unconstrained answers in a fenced block (with keys of its own)."""

from __future__ import annotations

import json

import pytest

import qwenkit
from qwenkit.engine.llm import LLM
from qwenkit.engine.sampling_params import SamplingParams, StructuredOutputs

pytest.importorskip("llguidance")
pytestmark = pytest.mark.slow

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "born", "field", "nobel_prizes"],
          "properties": {"name": {"type": "string"}, "born": {"type": "integer"},
                         "field": {"enum": ["physics", "chemistry", "biology", "mathematics"]},
                         "nobel_prizes": {"type": "integer", "minimum": 0}}}
TEXTS = {"Marie Curie, born in 1867, was a physicist who won two Nobel Prizes.":
         {"name": "Marie Curie", "born": 1867, "field": "physics", "nobel_prizes": 2},
         "Emmy Noether (born 1882) changed mathematics; she never won a Nobel Prize.":
         {"name": "Emmy Noether", "born": 1882, "field": "mathematics", "nobel_prizes": 0}}


def test_greedy_json_extraction_gives_the_facts(default_model_path):
    tok = qwenkit.load_tokenizer(default_model_path)
    llm = LLM(qwenkit.load_model(default_model_path), tok, num_blocks=64, block_size=16)
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"Extract the person as JSON.\n\n{text}"}],
                                       add_generation_prompt=True, tokenize=True) for text in TEXTS]
    params = SamplingParams(max_tokens=80, temperature=0, structured=StructuredOutputs(json=SCHEMA, strict=True))
    outs = llm.generate(prompts, params)
    for out, expected in zip(outs, TEXTS.values()):
        assert out.finish_reason == "stop", out.text
        assert json.loads(out.text) == expected, out.text
    free = llm.generate(prompts[:1], SamplingParams(max_tokens=30, temperature=0))[0].text
    with pytest.raises(ValueError):
        json.loads(free)  # the grammar, not the prompt, made the answers JSON
