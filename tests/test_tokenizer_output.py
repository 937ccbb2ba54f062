"""Reply parsing: Qwen tool calls and Qwen3 reasoning, whole and streamed."""

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from qwenkit.tokenizer.output import OutputStream, collect, parse_output
from qwenkit.tokenizer.reasoning import split_reasoning
from qwenkit.tokenizer.tools import parse_tool_calls

TWO_CALLS = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 12345}}\n'
             '</tool_call>\n<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>')


def test_tool_calls_become_openai_calls():
    content, calls, errors = parse_tool_calls(TWO_CALLS)
    assert content == "Let me check." and errors == []
    assert calls == [
        {"id": "call_0", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 12345}'}},
        {"id": "call_1", "type": "function", "function": {"name": "now", "arguments": "{}"}}]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "days": 12345}


def test_malformed_call_stays_as_content_with_an_error():
    text = 'Hi <tool_call>{"name": "f", "arguments": {"x": 1}</tool_call> bye'
    content, calls, errors = parse_tool_calls(text)
    assert content == text and calls == []
    assert errors[0]["text"] == '<tool_call>{"name": "f", "arguments": {"x": 1}</tool_call>'
    assert "JSON" in errors[0]["error"]


def test_unterminated_last_call_is_still_parsed():
    content, calls, _ = parse_tool_calls('<tool_call>\n{"name": "f", "arguments": {"a": "b"}}\n')
    assert content == "" and calls[0]["function"]["name"] == "f"


def test_reasoning_split():
    assert split_reasoning("<think>\nhmm\n</think>\n\nAnswer") == ("hmm", "Answer")
    assert split_reasoning("Answer <think>x</think>") == (None, "Answer <think>x</think>")
    # The prompt opened <think>: the reply starts inside the reasoning.
    assert split_reasoning("hmm\n</think>\n\nAnswer", started_in_reasoning=True) == ("hmm", "Answer")
    assert split_reasoning("still thinking", started_in_reasoning=True) == ("still thinking", "")


def test_reasoning_then_tool_call_message():
    text = "<think>\nI should call now.\n<tool_call>not a call</tool_call>\n</think>\n\n" + TWO_CALLS
    msg = parse_output(text).to_message()
    assert msg["reasoning_content"].endswith("<tool_call>not a call</tool_call>")
    assert msg["content"] == "Let me check." and len(msg["tool_calls"]) == 2


PIECES = st.sampled_from([
    "<think>", "</think>", "<tool_call>", "</tool_call>", "\n", "\n\n", " ", "  ", "x", "hello", "<", "</", "<t",
    "<tool_", "</think", "{", "}", '"', ":", ", ", '"name"', '"f"', '"arguments"', "12", "3.5", "-7e3", "[1, 2]",
    '{"name": "f", "arguments": {"n": 12345, "s": "a b"}}', '{"name": "g", "arguments": "{}"}', '{"bad": ',
    "思考", "🙂"])
TEXT = st.lists(PIECES, max_size=25).map("".join)


def _cuts(text, data):
    points = sorted(data.draw(st.sets(st.integers(0, len(text)), max_size=12)))
    bounds = [0, *points, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


@settings(max_examples=800, deadline=None)
@given(text=TEXT, data=st.data(), started=st.booleans(), reasoning=st.booleans(), tools=st.booleans())
def test_stream_equals_whole_for_every_cut(text, data, started, reasoning, tools):
    opts = dict(reasoning=reasoning, tools=tools, started_in_reasoning=started)
    stream = OutputStream(**opts)
    deltas = [stream.feed(chunk) for chunk in _cuts(text, data)] + [stream.finish()]
    assert collect(deltas) == parse_output(text, **opts)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), number=st.integers(-10**12, 10**12), ws=st.sampled_from(["", "\n", " \n "]))
def test_numbers_cut_anywhere_in_arguments(data, number, ws):
    text = f'ok{ws}<tool_call>{ws}{{"name": "f", "arguments": {{"n": {number}, "x": {number / 7}}}}}{ws}</tool_call>{ws}'
    stream = OutputStream()
    deltas = [stream.feed(chunk) for chunk in _cuts(text, data)] + [stream.finish()]
    out = collect(deltas)
    assert out == parse_output(text)
    assert json.loads(out.tool_calls[0]["function"]["arguments"]) == {"n": number, "x": number / 7}
    assert out.content == "ok"
