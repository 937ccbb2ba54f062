"""XML tool calls (Qwen3-Coder, Qwen3.5): a hand-written reference corpus, the stream against the
whole-text parse at every split point, arguments streamed as they arrive, the format chosen from
the chat template."""

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwenkit.tokenizer.output import OutputStream, collect, parse_output, tool_format
from qwenkit.tokenizer.tool_xml import XmlToolCallStream

DATA = Path(__file__).parent / "data"
CORPUS = json.loads((DATA / "tool_calls_xml" / "corpus.json").read_text(encoding="utf-8"))
TOOLS = CORPUS["tools"]
OPTS = dict(tools=TOOLS, tool_format="xml")
CASES = pytest.mark.parametrize("case", CORPUS["cases"], ids=[c["name"] for c in CORPUS["cases"]])


def test_corpus_is_large_enough():
    assert len(CORPUS["cases"]) >= 60


@CASES
def test_corpus_matches_reference(case):
    out = parse_output(case["text"], **OPTS)
    assert out.content == case["content"]
    assert out.reasoning_content == case["reasoning"]
    assert [c["function"]["name"] for c in out.tool_calls] == [c["name"] for c in case["calls"]]
    assert [json.loads(c["function"]["arguments"]) for c in out.tool_calls] == [c["arguments"] for c in case["calls"]]
    # arguments are one JSON object, written as json.dumps writes it (no lost or doubled braces)
    assert [c["function"]["arguments"] for c in out.tool_calls] == \
           [json.dumps(c["arguments"], ensure_ascii=False) for c in case["calls"]]
    assert [c["id"] for c in out.tool_calls] == [f"call_{i}" for i in range(len(case["calls"]))]
    assert len(out.errors) == case["errors"], out.errors


def _streamed(text: str, cuts: list[int]):
    stream = OutputStream(**OPTS)
    bounds = [0, *cuts, len(text)]
    return collect([stream.feed(text[a:b]) for a, b in zip(bounds, bounds[1:])] + [stream.finish()])


@CASES
def test_corpus_streamed_at_every_split_point_equals_whole(case):
    text = case["text"]
    whole = parse_output(text, **OPTS)
    for i in range(len(text) + 1):
        assert _streamed(text, [i]) == whole, f"split at {i}: {text[:i]!r} | {text[i:]!r}"
    assert _streamed(text, list(range(1, len(text)))) == whole  # one character at a time


PIECES = st.sampled_from([
    "<tool_call>", "</tool_call>", "<function=", "</function>", "<parameter=", "</parameter>", "<think>", "</think>",
    "get_weather>", "edit>", "run>", "city>", "days>", "timeout>", "options>", "content>", "x>", ">", "=", "\n", "\n\n",
    " ", "Paris", "12", "2.5", "true", "None", '{"a": [1, "<b>"]}', "[1, 2]", "a < b", "c > d", "<", "</", "<para",
    "</param", "<tool_", "{", '"', "\\", "東京", "🙂", '{"name": "run", "arguments": {"command": "ls"}}'])


@settings(max_examples=600, deadline=None)
@given(text=st.lists(PIECES, max_size=30).map("".join), data=st.data())
def test_stream_equals_whole_for_any_cuts(text, data):
    cuts = sorted(data.draw(st.sets(st.integers(0, len(text)), max_size=12)))
    assert _streamed(text, cuts) == parse_output(text, **OPTS)


def test_string_arguments_stream_as_they_arrive():
    stream = XmlToolCallStream(TOOLS)
    _, deltas, _ = stream.feed("<tool_call>\n<function=write_file>\n<parameter=content>\nline one\nline t")
    assert deltas[0] == {"index": 0, "id": "call_0", "type": "function",
                         "function": {"name": "write_file", "arguments": ""}}
    assert "".join(d["function"]["arguments"] for d in deltas) == '{"content": "line one\\nline t'
    _, more, _ = stream.feed("wo\n</parameter>\n<parameter=path>\na.txt\n</parameter>\n</function>\n</tool_call>")
    assert "".join(d["function"]["arguments"] for d in more) == 'wo", "path": "a.txt"}'
    assert all(d["index"] == 0 and set(d) == {"index", "function"} for d in more)


def test_typed_argument_is_sent_once_whole():
    stream = XmlToolCallStream(TOOLS)
    _, deltas, _ = stream.feed("<tool_call>\n<function=get_weather>\n<parameter=days>\n1")
    assert "".join(d["function"]["arguments"] for d in deltas) == ""  # 1 may become 12
    _, more, _ = stream.feed("2\n</parameter>\n")
    assert "".join(d["function"]["arguments"] for d in more) == '{"days": 12'


def test_malformed_parameter_error_names_it():
    text = "<tool_call>\n<function=get_weather>\n<parameter=city\nParis\n</parameter>\n</function>\n</tool_call>"
    out = parse_output(text, **OPTS)
    assert out.tool_calls[0]["function"]["arguments"] == "{}"
    assert out.errors == [{"text": "<parameter=city\nParis", "error": "malformed parameter (no `>` after the name), skipped"}]


def test_tool_format_from_the_chat_template():
    qwen3 = json.loads((DATA / "tokenizer" / "qwen3_tokenizer_config.json").read_text(encoding="utf-8"))["chat_template"]
    coder = (DATA / "tool_calls_xml" / "chat_template.jinja").read_text(encoding="utf-8")
    assert tool_format(qwen3) == "json" and tool_format(None) == "json"
    assert tool_format(coder) == "xml"
    literal = "{{- '<function=' + name + '>' }}{{- '<parameter=' + k + '>' + v + '</parameter>' }}"
    assert tool_format(literal) == "xml_literal"
    text = "<tool_call>\n<function=f>\n<parameter=a>\nx\n</parameter>\n</function>\n</tool_call>"
    framed = parse_output(text, tool_format="xml").tool_calls[0]["function"]["arguments"]
    unframed = parse_output(text, tool_format="xml_literal").tool_calls[0]["function"]["arguments"]
    assert (json.loads(framed), json.loads(unframed)) == ({"a": "x"}, {"a": "\nx\n"})
