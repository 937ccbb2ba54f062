"""Structured outputs in the engine (`LLM.generate` with `SamplingParams(structured=...)`): a tiny
random model follows any grammar, because the mask forbids every token that would leave it. The
outputs are parsed and checked against the schema, regex or grammar they were held to."""

from __future__ import annotations

import json
import re

import pytest
import torch

import qwenkit
from qwenkit.engine.llm import LLM
from qwenkit.engine.sampling_params import SamplingParams, StructuredOutputs
from qwenkit.engine.structured import CLOSE_THINKING
from qwenkit.errors import RequestError
from test_engine import tiny_model
from test_server import VOCAB, write_tokenizer

pytest.importorskip("llguidance")

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "pets"], "properties": {
    "name": {"type": "string", "maxLength": 6}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "pets": {"type": "array", "maxItems": 3, "items": {"enum": ["cat", "dog"]}}}}


def valid_person(obj) -> bool:
    return (isinstance(obj, dict) and set(obj) == {"name", "age", "pets"} and isinstance(obj["name"], str)
            and len(obj["name"]) <= 6 and type(obj["age"]) is int and 0 <= obj["age"] <= 120
            and isinstance(obj["pets"], list) and len(obj["pets"]) <= 3 and set(obj["pets"]) <= {"cat", "dog"})


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return qwenkit.load_tokenizer(write_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def llm(tokenizer):
    model = tiny_model(vocab_size=VOCAB, max_position_embeddings=2048)
    model.eos_token_ids = [258, 256]
    return LLM(model, tokenizer, num_blocks=800, block_size=8)


def answer_prompt(tokenizer, text: str) -> list[int]:
    """A chat prompt with thinking turned off: the answer (and the constraint) starts at once."""
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True, enable_thinking=False)


def sampled(seed: int, max_tokens: int = 300, **spec) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed, structured=StructuredOutputs(**spec))


def test_json_schema_outputs_parse_and_validate(llm, tokenizer):
    prompts = [answer_prompt(tokenizer, f"Person {i}?") for i in range(4)]
    outs = llm.generate(prompts, [sampled(i, json=PERSON, strict=True) for i in range(4)])
    for out in outs:
        assert out.finish_reason == "stop", out.text
        assert valid_person(json.loads(out.text)), out.text


def test_json_object_regex_choice_and_grammars(llm, tokenizer):
    prompt = answer_prompt(tokenizer, "Say something")
    cases = [
        (dict(json_object=True), lambda t: isinstance(json.loads(t), dict)),
        (dict(json=json.dumps({"type": "array", "maxItems": 4, "items": {"type": "boolean"}})),
         lambda t: isinstance(json.loads(t), list) and all(isinstance(x, bool) for x in json.loads(t))),
        (dict(regex=r"[0-9]{3}-[a-z]{2,4}"), lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", t)),
        (dict(choice=["yes", "no", 'say "maybe"']), lambda t: t in ("yes", "no", 'say "maybe"')),
        (dict(grammar='root ::= "v" [0-9] [0-9]? "." ("x" | "y")'), lambda t: re.fullmatch(r"v[0-9]{1,2}\.[xy]", t)),
        (dict(grammar='start: "(" item ("," item)* ")"\nitem: /[a-c]{1,3}/'),
         lambda t: re.fullmatch(r"\([a-c]{1,3}(,[a-c]{1,3})*\)", t)),
    ]
    for seed in range(2):
        outs = llm.generate([prompt] * len(cases), [sampled(seed, 120, **spec) for spec, _ in cases])
        for (spec, ok), out in zip(cases, outs):
            if spec.get("json_object") and out.finish_reason == "length":
                continue  # any object may hold an endless string; the others are bounded
            assert out.finish_reason == "stop" and ok(out.text), (spec, out.text)


def test_a_constrained_row_leaves_the_other_rows_alone(llm, tokenizer):
    prompts = [answer_prompt(tokenizer, t) for t in ("one", "two", "three")]
    free = [SamplingParams(max_tokens=24, temperature=0), SamplingParams(max_tokens=24, temperature=0.8, seed=5),
            SamplingParams(max_tokens=24, temperature=1.0, seed=9)]
    alone = llm.generate(prompts, free)
    guided = sampled(1, json=PERSON)
    mixed = llm.generate([prompts[0], prompts[0], prompts[1], prompts[2]], [free[0], guided, free[1], free[2]])
    assert [o.token_ids for o in alone] == [mixed[0].token_ids, mixed[2].token_ids, mixed[3].token_ids]
    assert valid_person(json.loads(mixed[1].text))


def test_logprobs_are_the_models_own(llm, tokenizer):
    prompt = answer_prompt(tokenizer, "x")
    free = llm.generate(prompt, SamplingParams(max_tokens=1, temperature=0, logprobs=2))[0]
    held = llm.generate(prompt, SamplingParams(max_tokens=1, temperature=0, logprobs=2,
                                               structured=StructuredOutputs(choice=["{"])))[0]
    assert held.text == "{"
    assert [t for t, _ in held.logprobs[0][2]] == [t for t, _ in free.logprobs[0][2]]  # unmasked top tokens
    assert [p for _, p in held.logprobs[0][2]] == pytest.approx([p for _, p in free.logprobs[0][2]], abs=1e-4)


@pytest.mark.parametrize("spec, message", [
    (dict(json={"type": "objekt"}), "structured.json: Invalid type: objekt"),
    (dict(json="{not json", strict=True), "structured.json: Expecting property name"),
    (dict(json=[1, 2]), "structured.json: a JSON schema is an object"),
    (dict(regex="a(b"), "structured.regex:"),
    (dict(grammar="start: missing_rule"), 'structured.grammar: at 1(8): unknown name: "missing_rule"'),
    (dict(grammar="root ::= (("), "structured.grammar: not a valid Lark or GBNF grammar"),
    (dict(json={"type": "string", "format": "ipv5"}, strict=True), "structured.json: Unknown format: ipv5"),
    (dict(json={"if": {"type": "string"}}, strict=True), 'structured.json: Unimplemented keys: ["if"]'),
])
def test_a_grammar_that_cannot_compile_is_a_request_error(llm, spec, message):
    with pytest.raises(RequestError, match=re.escape(message)):
        llm.generate([1, 2, 3], SamplingParams(structured=StructuredOutputs(**spec)))


def test_not_strict_ignores_what_it_cannot_enforce(llm, tokenizer):
    spec = dict(json={"type": "integer", "if": {"minimum": 3}, "maximum": 99})
    out = llm.generate(answer_prompt(tokenizer, "n?"), sampled(0, **spec))[0]
    value = json.loads(out.text)
    assert type(value) is int and value <= 99, out.text


def test_structured_outputs_take_exactly_one_kind():
    with pytest.raises(RequestError, match="exactly one of"):
        StructuredOutputs(regex="a", choice=["b"])
    with pytest.raises(RequestError, match="exactly one of"):
        StructuredOutputs()


def test_the_constraint_starts_after_the_thought(llm, tokenizer):
    think, close = tokenizer.special_tokens["<think>"], tokenizer.special_tokens["</think>"]
    prompt = answer_prompt(tokenizer, "Think first")[:-3]  # ends "...assistant\n<think>\n\n" (still open)
    assert prompt[-3] == think and close not in prompt[-3:]
    budget = 6
    outs = llm.generate([prompt] * 4, [SamplingParams(max_tokens=300, temperature=1.0, seed=s, thinking_budget=budget,
                                                      structured=StructuredOutputs(json=PERSON)) for s in range(4)])
    for out in outs:
        assert close in out.token_ids, out.text
        thought = out.token_ids[:out.token_ids.index(close)]
        assert len(thought) <= budget + len(tokenizer.encode(CLOSE_THINKING))
        answer = tokenizer.decode(out.token_ids[out.token_ids.index(close) + 1:], skip_special_tokens=True)
        assert valid_person(json.loads(answer)), answer


def test_allowed_tokens_unpacks_each_bit_as_the_plain_reference():
    from qwenkit.engine.structured import allowed_tokens

    bits = torch.randint(-2**31, 2**31 - 1, (3, 5), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    bits[0, 4] = -2**31  # only the sign bit: token 4 * 32 + 31
    reference = torch.tensor([[bool(int(bits[r, t // 32]) >> (t % 32) & 1) for t in range(150)] for r in range(3)])
    assert torch.equal(allowed_tokens(bits, 150), reference)
    assert allowed_tokens(bits, 160)[0, 159] and allowed_tokens(bits, 160)[0, 128:159].sum() == 0
