"""Forced tool calls in the XML form (Qwen3-Coder, Qwen3.5): `tool_choice: "required"`, a named
function and `parallel_tool_calls: false` on a model whose chat template writes
`<function=NAME><parameter=ARG>` calls. The model is tiny and random, so only the grammar makes its
calls parse; every call is checked against its tool's schema, through the real server and the
`openai` client on loopback, streamed and whole. The grammar itself is checked on texts the
template renders (accepted) and on texts the parser would misread (refused)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import qwenkit
from qwenkit.engine import EngineSettings
from qwenkit.tokenizer.chat import compile_template
from test_engine import tiny_model
from test_server import VOCAB, Server, write_tokenizer

openai = pytest.importorskip("openai")
llguidance = pytest.importorskip("llguidance")

TEMPLATE = (Path(__file__).parent / "data" / "tool_calls_xml" / "chat_template.jinja").read_text(encoding="utf-8")
# Thinking off, as Qwen3.5's template writes it: the answer (and the grammar) starts at once. A
# random model let to open `<think>` would spend max_tokens in the unconstrained thought.
GENERATION_PROMPT = "{{- '<|im_start|>assistant\\n' }}"
NO_THINKING_TEMPLATE = TEMPLATE.replace(GENERATION_PROMPT, GENERATION_PROMPT + "{{- '<think>\\n\\n</think>\\n\\n' }}")
ASK = [{"role": "user", "content": "Do it."}]
TOOLS = [{"type": "function", "function": {"name": "write_file", "parameters": {
             "type": "object", "required": ["path", "mode"], "additionalProperties": False, "properties": {
                 "path": {"type": "string", "minLength": 1, "maxLength": 8}, "mode": {"type": "integer", "minimum": 0,
                                                                                      "maximum": 511},
                 "force": {"type": "boolean"}, "meta": {"type": "object", "required": ["tag"],
                                                        "additionalProperties": False,
                                                        "properties": {"tag": {"enum": ["a", "b"]}}}}}}},
         {"type": "function", "function": {"name": "get_weather", "parameters": {
             "type": "object", "required": ["city", "days"], "properties": {
                 "city": {"enum": ["Paris", "Oslo"]}, "days": {"type": "integer", "minimum": 1, "maximum": 7}}}}}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def valid(value, schema) -> bool:
    """Whether value fits schema, for the keywords these tools use."""
    kind = schema.get("type")
    types = {"string": str, "integer": int, "boolean": bool, "object": dict}
    if kind and not isinstance(value, types[kind]) or kind == "integer" and isinstance(value, bool):
        return False
    if "enum" in schema and value not in schema["enum"]:
        return False
    if not schema.get("minimum", value) <= value <= schema.get("maximum", value) if kind == "integer" else False:
        return False
    if kind == "string" and not schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", len(value)):
        return False
    if kind == "object":
        props = schema.get("properties", {})
        return (set(schema.get("required", [])) <= set(value) and
                (schema.get("additionalProperties", True) is not False or set(value) <= set(props)) and
                all(valid(v, props[k]) for k, v in value.items() if k in props))
    return True


def check(calls):
    for name, arguments in calls:
        assert name in SCHEMAS and valid(json.loads(arguments), SCHEMAS[name]), (name, arguments)
    return [name for name, _ in calls]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    root = write_tokenizer(tmp_path_factory.mktemp("tok"))
    config = json.loads((root / "tokenizer_config.json").read_text())
    (root / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": NO_THINKING_TEMPLATE}))
    return qwenkit.load_tokenizer(root)


@pytest.fixture(scope="module")
def server(tokenizer):
    m = tiny_model(vocab_size=VOCAB, max_position_embeddings=2048, seed=3)
    m.eos_token_ids = [258, 256]
    s = Server(m, tokenizer, EngineSettings(block_size=8, num_blocks=800, max_prefill_tokens=256))
    yield s
    s.close()


def whole_and_streamed(server, **kw):
    """(choice, [(name, arguments)] whole, the same assembled from the stream's deltas)."""
    kw = dict(model="tiny", messages=ASK, tools=TOOLS, max_tokens=400, temperature=1.0, **kw)
    choice = server.client.chat.completions.create(**kw).choices[0]
    calls = {}
    for chunk in server.client.chat.completions.create(**kw, stream=True):
        for d in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
            name, args = calls.get(d.index, ("", ""))
            calls[d.index] = (name + (d.function.name or ""), args + (d.function.arguments or ""))
    whole = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
    return choice, whole, [calls[i] for i in sorted(calls)]


def test_required_single_call_parses_and_validates_streamed_as_whole(server):
    for seed in range(4):
        choice, whole, streamed = whole_and_streamed(server, tool_choice="required", parallel_tool_calls=False,
                                                     seed=seed)
        assert choice.finish_reason == "tool_calls" and len(whole) == 1, choice.message
        check(whole)
        assert streamed == whole


def test_named_function_is_the_one_called(server):
    named = {"type": "function", "function": {"name": "get_weather"}}
    for seed in range(3):
        choice, whole, streamed = whole_and_streamed(server, tool_choice=named, parallel_tool_calls=False, seed=seed)
        assert check(whole) == ["get_weather"] and streamed == whole and choice.finish_reason == "tool_calls"


def test_parallel_calls_each_validate(server):
    for seed in range(2):
        choice, whole, streamed = whole_and_streamed(server, tool_choice="required", seed=seed)
        # max_tokens may cut the last of many calls short: every complete one must validate
        complete = whole if choice.finish_reason != "length" else whole[:-1]
        assert whole and streamed == whole
        check(complete)


def grammar_accepts(tokenizer, lark: str, text: str) -> bool:
    ll = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=VOCAB, eos_token=[258])
    matcher = llguidance.LLMatcher(ll, llguidance.LLMatcher.grammar_from_lark(lark), log_level=0)
    return matcher.consume_tokens(tokenizer.encode(text)) and matcher.is_accepting()


def test_grammar_takes_what_the_template_writes_and_refuses_what_misparses(tokenizer):
    from qwenkit.server.constraints import tool_call_grammar

    tools = [{"type": "function", "function": {"name": "edit", "parameters": {
        "type": "object", "required": ["code"], "properties": {"code": {"type": "string"}, "n": {"type": "number"},
                                                               "opts": {"type": "object"}}}}}]
    lark = tool_call_grammar(tools, tokenizer.special_tokens, parallel=False, tool_format="xml").grammar
    args = {"code": "if a < b and c > d:\n    x = '<p>'\n", "n": 2.5, "opts": {"k": [1, True]}}
    message = {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
        "name": "edit", "arguments": args}}]}
    rendered = compile_template(TEMPLATE).render(messages=[*ASK, message], tools=tools)
    call = rendered.split("<|im_start|>assistant\n")[-1].removesuffix("<|im_end|>\n").strip("\n")
    assert grammar_accepts(tokenizer, lark, call)
    assert not grammar_accepts(tokenizer, lark, call.replace("x = '<p>'", "x = '</function>'"))
    assert not grammar_accepts(tokenizer, lark, call.replace("2.5", "two"))  # a number's text is a number
    assert not grammar_accepts(tokenizer, lark, call.replace("<parameter=n>", "<parameter=m>"))  # undeclared
    no_code = "<tool_call>\n<function=edit>\n<parameter=n>\n1\n</parameter>\n</function>\n</tool_call>"
    assert not grammar_accepts(tokenizer, lark, no_code)  # a required parameter is missing
