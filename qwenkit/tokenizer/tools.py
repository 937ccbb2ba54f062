"""Qwen tool calls: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks in a reply
become OpenAI-style `tool_calls`.

`parse_tool_calls` is the rule, `ToolCallStream` the same rule on text arriving in chunks (it
emits a call once its block is complete, so a number cut across chunks is never half-parsed).
Streams of every tool-call format (this one, tool_xml's) return OpenAI stream deltas, each
with its call's `index`; `merge_tool_deltas` joins them into whole calls.
A block whose JSON is malformed stays in the content verbatim and adds an error record.
Whitespace next to a well-formed block is dropped (it only separated the blocks).
"""

import json
import re

from .reasoning import partial_suffix

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(CALL_OPEN) + r"(.*?)(" + re.escape(CALL_CLOSE) + r"|\Z)", re.S)


def call_from_json(body: str, index: int, id_prefix: str = "call_") -> tuple[dict | None, str | None]:
    """(OpenAI tool call, None) for a well-formed block body, else (None, why not)."""
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError) as e:  # a model can write JSON nested past the parser's limit
        return None, f"invalid JSON: {e}"
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None, 'expected an object with a string "name"'
    args = obj.get("arguments", obj.get("parameters", {}))
    arguments = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return {"id": f"{id_prefix}{index}", "type": "function",
            "function": {"name": obj["name"], "arguments": arguments}}, None


def parse_tool_calls(text: str, id_prefix: str = "call_") -> tuple[str, list[dict], list[dict]]:
    """(content, tool_calls, errors) of a complete reply."""
    segments, blocks = [], []  # text, block, text, block, ..., text
    pos = 0
    for m in _BLOCK.finditer(text):
        segments.append(text[pos:m.start()])
        blocks.append((m.group(0), m.group(1)))
        pos = m.end()
    segments.append(text[pos:])
    calls, errors, valid = [], [], []
    for raw, body in blocks:
        call, error = call_from_json(body, len(calls), id_prefix)
        valid.append(call is not None)
        if call:
            calls.append(call)
        else:
            errors.append({"text": raw, "error": error})
    content = []
    for k, segment in enumerate(segments):
        if k > 0 and valid[k - 1]:
            segment = segment.lstrip()
        if k < len(blocks) and valid[k]:
            segment = segment.rstrip()
        content.append(segment if k == len(blocks) or valid[k] else segment + blocks[k][0])
    return "".join(content), calls, errors


def merge_tool_deltas(deltas: list[dict]) -> list[dict]:
    """Whole calls from stream deltas: the first delta of an index opens its call (id, name),
    later ones append to its arguments."""
    calls: dict[int, dict] = {}
    for d in deltas:
        fn = d.get("function", {})
        if d["index"] not in calls:
            calls[d["index"]] = {"id": d.get("id"), "type": "function",
                                 "function": {"name": fn.get("name"), "arguments": ""}}
        calls[d["index"]]["function"]["arguments"] += fn.get("arguments", "")
    return [calls[i] for i in sorted(calls)]


class ToolCallStream:
    """Feed content chunks; each call returns (content delta, tool-call deltas, new errors)."""

    def __init__(self, id_prefix: str = "call_"):
        self._id_prefix = id_prefix
        self._buf = ""
        self._in_call = False
        self._held_space = ""  # whitespace before an open block: dropped if the block parses
        self._skip_space = False  # right after a parsed block, whitespace is dropped
        self._n_calls = 0

    def feed(self, chunk: str) -> tuple[str, list[dict], list[dict]]:
        self._buf += chunk
        out, calls, errors = [], [], []
        while True:
            if self._in_call:
                end = self._buf.find(CALL_CLOSE)
                if end < 0:
                    return "".join(out), calls, errors
                body, self._buf = self._buf[:end], self._buf[end + len(CALL_CLOSE):]
                out.append(self._close_block(body, CALL_CLOSE, calls, errors))
            else:
                start = self._buf.find(CALL_OPEN)
                if start < 0:
                    out.append(self._text_without_block())
                    return "".join(out), calls, errors
                out.append(self._text_before_block(start))

    def finish(self) -> tuple[str, list[dict], list[dict]]:
        """End of text: an unterminated last block is still parsed; held text is released."""
        calls, errors = [], []
        if self._in_call:
            text = self._close_block(self._buf, "", calls, errors)
        else:
            text = self._skip(self._buf)
        self._buf = ""
        return text, calls, errors

    def _text_without_block(self) -> str:
        # Hold back what may start a block tag, and whitespace that may precede one.
        cut = len(self._buf) - partial_suffix(self._buf, CALL_OPEN)
        head, tail = self._skip(self._buf[:cut]), self._buf[cut:]
        text = head.rstrip()
        self._buf = head[len(text):] + tail
        return text

    def _text_before_block(self, start: int) -> str:
        head = self._skip(self._buf[:start])
        text = head.rstrip()
        self._held_space = head[len(text):]
        self._buf = self._buf[start + len(CALL_OPEN):]
        self._in_call = True
        return text

    def _close_block(self, body: str, close: str, calls: list, errors: list) -> str:
        self._in_call = False
        call, error = call_from_json(body, self._n_calls, self._id_prefix)
        held, self._held_space = self._held_space, ""
        if call:
            calls.append({"index": self._n_calls, **call})
            self._n_calls += 1
            self._skip_space = True
            return ""
        errors.append({"text": CALL_OPEN + body + close, "error": error})
        return self._skip(held + CALL_OPEN + body + close)

    def _skip(self, text: str) -> str:
        if self._skip_space:
            text = text.lstrip()
            self._skip_space = not text
        return text
