"""XML tool calls through the real server: a model whose chat template writes calls in the
Qwen3-Coder form gets them parsed (whole and streamed, arguments arriving piece by piece),
with the real `openai` client on loopback. The tiny model is forced to write the call after
one known prompt; the template round-trips arguments through the parser."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import qwenkit
from qwenkit.engine import EngineSettings
from qwenkit.tokenizer.chat import compile_template
from qwenkit.tokenizer.output import parse_output
from test_engine import tiny_model
from test_server import VOCAB, ScriptedQwen, Server, write_tokenizer

TEMPLATE = (Path(__file__).parent / "data" / "tool_calls_xml" / "chat_template.jinja").read_text(encoding="utf-8")
TOOLS = [{"type": "function", "function": {"name": "write_file", "parameters": {"type": "object", "properties": {
    "path": {"type": "string"}, "content": {"type": "string"}, "mode": {"type": "integer"}}}}}]
ASK = [{"role": "user", "content": "Write the comparison helper."}]
CODE = "def lt(a, b):\n    return a < b and b > 0\n"
REPLY = ("I will write it.\n<tool_call>\n<function=write_file>\n<parameter=path>\nlt.py\n</parameter>\n"
         f"<parameter=content>\n{CODE}\n</parameter>\n<parameter=mode\n420\n</parameter>\n</function>\n</tool_call>")
EXPECTED = {"path": "lt.py", "content": CODE}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    root = write_tokenizer(tmp_path_factory.mktemp("tok"))
    config = json.loads((root / "tokenizer_config.json").read_text())
    (root / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    return qwenkit.load_tokenizer(root)


@pytest.fixture(scope="module")
def server(tokenizer):
    m = tiny_model(vocab_size=VOCAB, max_position_embeddings=2048, seed=2)
    m.__class__ = ScriptedQwen
    m.eos_token_ids = [258, 256]
    prompt = tokenizer.apply_chat_template(ASK, tools=TOOLS, tokenize=True)
    m.scripts = {len(prompt): tokenizer.encode(REPLY) + [258]}
    s = Server(m, tokenizer, EngineSettings(block_size=8, num_blocks=600))
    yield s
    s.close()


def test_xml_tool_call_whole_reply(server):
    r = server.client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=300, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "I will write it."
    [call] = choice.message.tool_calls
    assert call.function.name == "write_file" and json.loads(call.function.arguments) == EXPECTED


def test_xml_tool_call_streamed_argument_by_argument(server):
    chunks = list(server.client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=300,
                                                        temperature=0, stream=True))
    deltas = [t for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or []]
    assert deltas[0].id and deltas[0].function.name == "write_file" and deltas[0].function.arguments == ""
    assert {d.index for d in deltas} == {0} and all(d.function.name is None for d in deltas[1:])
    pieces = [d.function.arguments for d in deltas[1:]]
    assert len(pieces) > 10  # the code arrived as it was written, not in one piece at the end
    assert json.loads("".join(pieces)) == EXPECTED
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "I will write it."


def test_arguments_round_trip_through_the_template():
    args = {"path": "a b.py", "content": "x = '<a>'\n\nif x > y:\n    pass\n", "mode": 420,
            "flags": {"force": True, "depth": [1, 2]}, "empty": "", "lead": "\n  indented"}
    message = {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
        "name": "write_file", "arguments": args}}]}
    schema = {"type": "object", "properties": {"mode": {"type": "integer"}, "flags": {"type": "object"}}}
    tools = [{"type": "function", "function": {"name": "write_file", "parameters": schema}}]
    text = compile_template(TEMPLATE).render(messages=[*ASK, message], tools=tools)
    reply = text.split("<|im_start|>assistant\n")[-1].removesuffix("<|im_end|>\n")
    out = parse_output(reply, tools=tools, tool_format="xml")
    assert json.loads(out.tool_calls[0]["function"]["arguments"]) == args
    assert out.content == "" and out.errors == []


def test_each_of_n_choices_has_its_calls_with_distinct_ids(server):
    kw = dict(model="tiny", messages=ASK, tools=TOOLS, max_tokens=300, temperature=0, n=2)
    whole = server.client.chat.completions.create(**kw)
    ids = [c.message.tool_calls[0].id for c in whole.choices]
    assert len(set(ids)) == 2 and all(json.loads(c.message.tool_calls[0].function.arguments) == EXPECTED
                                      for c in whole.choices)
    chunks = list(server.client.chat.completions.create(**kw, stream=True))
    streamed = {(c.choices[0].index, t.id) for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or []
                if t.id}
    assert len(streamed) == 2 and {i for i, _ in streamed} == {0, 1}
