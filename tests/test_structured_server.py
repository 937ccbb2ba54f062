"""Structured outputs and enforced tool choice through the HTTP server, with the official `openai`
client on loopback: response_format (json_schema, json_object), structured_outputs (regex, choice,
grammar) on both routes, streaming and not; tool_choice "required" / named / parallel_tool_calls;
a schema that cannot compile or a misspelt field is a 400 naming it. The model is tiny and random:
only the grammar makes its answers valid."""

from __future__ import annotations

import json
import re

import pytest

from qwenkit.engine import EngineSettings
from test_server import Server, model, tokenizer  # noqa: F401 (fixtures)
from test_structured import PERSON, valid_person

openai = pytest.importorskip("openai")
pytest.importorskip("llguidance")

NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
             "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}, "days": {"type": "integer",
                                              "minimum": 1, "maximum": 7}}, "required": ["city", "days"],
             "additionalProperties": False}}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"zone": {"type": "string", "maxLength": 5}}, "required": ["zone"],
             "additionalProperties": False}}}]


@pytest.fixture(scope="module")
def server(model, tokenizer):  # noqa: F811
    s = Server(model, tokenizer, EngineSettings(block_size=8, num_blocks=800, max_prefill_tokens=256))
    yield s
    s.close()


def chat(server, stream=False, **kw):
    base = dict(model="tiny", messages=[{"role": "user", "content": "Answer"}], max_tokens=200, temperature=1.0)
    kw = {**base, **kw}
    kw["extra_body"] = {**NO_THINK, **kw.get("extra_body", {})}
    if not stream:
        return server.client.chat.completions.create(**kw).choices[0]
    chunks = list(server.client.chat.completions.create(**kw, stream=True))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_json_schema_response_format_whole_and_streamed(server):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for seed in range(3):
        whole = chat(server, response_format=fmt, seed=seed)
        assert whole.finish_reason == "stop" and valid_person(json.loads(whole.message.content))
        assert chat(server, stream=True, response_format=fmt, seed=seed) == whole.message.content


def test_json_object_and_structured_outputs_on_chat(server):
    out = chat(server, response_format={"type": "json_object"}, seed=1, max_tokens=60)
    assert out.message.content.startswith("{")
    if out.finish_reason == "stop":
        assert isinstance(json.loads(out.message.content), dict)
    choice = chat(server, seed=2, extra_body={"structured_outputs": {"choice": ["alpha", "beta"]}})
    assert choice.message.content in ("alpha", "beta")
    grammar = 'root ::= "id-" [a-f0-9]{4}'
    text = chat(server, stream=True, seed=3, extra_body={"structured_outputs": {"grammar": grammar}})
    assert re.fullmatch(r"id-[a-f0-9]{4}", text)


def test_structured_outputs_on_completions(server):
    kw = dict(model="tiny", prompt="Phone: ", max_tokens=40, temperature=1.0, seed=4,
              extra_body={"structured_outputs": {"regex": r"\+[0-9]{2} [0-9]{3}-[0-9]{4}"}})
    whole = server.client.completions.create(**kw).choices[0]
    assert re.fullmatch(r"\+[0-9]{2} [0-9]{3}-[0-9]{4}", whole.text) and whole.finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in server.client.completions.create(**kw, stream=True))
    assert streamed == whole.text


@pytest.mark.parametrize("body, field", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
     "response_format.json_schema.schema: Invalid type: objekt"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema: a json_schema response format needs a schema"),
    ({"response_format": {"type": "json_scheme"}}, "response_format.type"),
    ({"response_format": {"type": "json_object", "shema": {}}}, "response_format.shema"),
    ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs.regex: "),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs: give exactly one"),
    ({"structured_outputs": {"jsonn": {}}}, "structured_outputs.jsonn"),
    ({"tool_choice": "required"}, "tool_choice: a tool call is required, but the request offers no tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "tool_choice: a forced tool call cannot be combined"),
    ({"thinking_budget": -1}, "thinking_budget"),
])
def test_bad_constraints_are_400s_naming_the_field(server, body, field):
    with pytest.raises(openai.BadRequestError) as e:
        chat(server, extra_body=body)
    assert field in e.value.body["message"]


def check_call(call, tools=TOOLS):
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    args = json.loads(call.function.arguments)
    assert call.function.name in schema and set(args) == set(schema[call.function.name]["required"])
    if call.function.name == "get_weather":
        assert args["city"] in ("Paris", "Oslo") and 1 <= args["days"] <= 7
    else:
        assert isinstance(args["zone"], str) and len(args["zone"]) <= 5
    return call.function.name


def test_tool_choice_required_gives_valid_calls(server):
    for seed in range(3):
        one = chat(server, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, seed=seed, max_tokens=300)
        assert one.finish_reason == "tool_calls" and len(one.message.tool_calls) == 1, one.message.content
        check_call(one.message.tool_calls[0])
        # parallel calls allowed: a random model may go on calling until max_tokens cuts the last one
        many = chat(server, tools=TOOLS, tool_choice="required", seed=seed, max_tokens=300)
        assert many.message.tool_calls and all(check_call(c) for c in many.message.tool_calls)


def test_named_tool_choice_and_one_call_only(server):
    named = {"type": "function", "function": {"name": "get_time"}}
    for seed in range(3):
        out = chat(server, tools=TOOLS, tool_choice=named, parallel_tool_calls=False, seed=seed, max_tokens=300)
        assert [check_call(c) for c in out.message.tool_calls] == ["get_time"]
        chunks = list(server.client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Answer"}], max_tokens=300, temperature=1.0,
            seed=seed, tools=TOOLS, tool_choice=named, parallel_tool_calls=False, stream=True, extra_body=NO_THINK))
        streamed = [c for ch in chunks if ch.choices for c in ch.choices[0].delta.tool_calls or []]
        assert [(c.function.name, c.function.arguments) for c in streamed] == \
            [(c.function.name, c.function.arguments) for c in out.message.tool_calls]


def test_tool_choice_none_never_calls(server):
    for seed in range(3):
        out = chat(server, tools=TOOLS, tool_choice="none", seed=seed, max_tokens=40)
        assert not out.message.tool_calls and out.finish_reason != "tool_calls"
