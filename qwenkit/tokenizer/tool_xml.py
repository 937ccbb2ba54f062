"""Qwen3-Coder / Qwen3.5 tool calls: the XML form, parsed while it streams.

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    </function>
    </tool_call>

`XmlToolCallStream` reads text in chunks and returns OpenAI stream deltas: a call's id and name
as soon as its `<function=NAME>` is complete, then its `arguments` JSON piece by piece, a string
value character by character as it arrives (values of other types once whole: see tool_args).
`parse_xml_tool_calls` is the same machine fed the whole text, so a stream cut anywhere adds up
to the whole-text parse. The rules, following how the chat template renders a call:
- a value is what lies between `<parameter=NAME>` and `</parameter>`, less one newline at each
  end when the template frames values with newlines (`framed`); a missing `</parameter>` ends
  the value where the next `<parameter=`, `</function>` or `</tool_call>` begins, so `<` and
  `>` inside code are plain text;
- a parameter whose header is broken (`<parameter=name` with no `>` on its line, an empty or
  repeated name) is skipped with an error record; the rest of the call survives;
- text that ends mid-call (max_tokens) keeps what was complete: the open value (less a closing
  tag cut short) and the call; a block without a `<function=NAME>` stays content, with an
  error record (a JSON `{"name": ...}` body is accepted too);
- `<function=` without the `<tool_call>` before it still opens a call (models drop the tag).
"""

from __future__ import annotations

import json
import re

from .reasoning import partial_suffix
from .tool_args import convert, is_text, param_types
from .tools import call_from_json, merge_tool_deltas

OPEN, CLOSE = "<tool_call>", "</tool_call>"
FUNC, FUNC_END = "<function=", "</function>"
PARAM, PARAM_END = "<parameter=", "</parameter>"
VALUE_ENDS = (PARAM_END, PARAM, FUNC_END, CLOSE)
CALL_TAGS = (PARAM, FUNC_END, CLOSE, FUNC)
_HEADER_END = re.compile(r"[>\n<]")


def parse_xml_tool_calls(text: str, tools=None, id_prefix: str = "call_",
                         framed: bool = True) -> tuple[str, list[dict], list[dict]]:
    """(content, tool_calls, errors) of a complete reply."""
    stream = XmlToolCallStream(tools, id_prefix, framed)
    content, deltas, errors = stream.feed(text)
    rest, more, more_errors = stream.finish()
    return content + rest, merge_tool_deltas(deltas + more), errors + more_errors


def _held(buf: str, tags) -> int:
    """How many characters at the end of buf may begin one of tags."""
    return max(partial_suffix(buf, t) for t in tags)


def _may_become(buf: str, tags) -> bool:
    """Whether more text could make buf one of tags (buf is empty or a proper prefix of one)."""
    return any(len(buf) < len(t) and t.startswith(buf) for t in tags)


def _header(buf: str, final: bool) -> tuple[int, str | None] | None:
    """For buf starting with `<tag=`: (end of the header, its name or None if broken), or None
    while it may still complete. A header ends at `>`; a newline or `<` first breaks it."""
    start = buf.index("=") + 1
    m = _HEADER_END.search(buf, start)
    if m is None:
        return (len(buf), None) if final else None
    if m.group() != ">":
        return m.start(), None
    return m.end(), buf[start:m.start()].strip() or None


class XmlToolCallStream:
    """Feed content chunks; each call returns (content delta, tool-call deltas, new errors)."""

    def __init__(self, tools=None, id_prefix: str = "call_", framed: bool = True):
        self._types = param_types(tools)
        self._id_prefix, self._framed = id_prefix, framed
        self._buf, self._state = "", self._text
        self._raw = ""  # the open block's text, until its function header decides what it is
        self._implicit = False  # the block opened with <function= (no <tool_call>)
        self._held_space, self._skip_space = "", False
        self._n_calls = 0
        self._out: list[str] = []
        self._deltas: list[dict] = []
        self._errors: list[dict] = []

    def feed(self, chunk: str) -> tuple[str, list[dict], list[dict]]:
        self._buf += chunk
        while self._state(final=False):
            pass
        return self._take()

    def finish(self) -> tuple[str, list[dict], list[dict]]:
        """End of text: whatever is open is closed as far as it got."""
        while self._state(final=True):
            pass
        self._buf = ""
        return self._take()

    def _take(self):
        out = ("".join(self._out), self._deltas, self._errors)
        self._out, self._deltas, self._errors = [], [], []
        return out

    def _consume(self, n: int) -> str:
        head, self._buf = self._buf[:n], self._buf[n:]
        return head

    # -- outside calls ------------------------------------------------------------------------

    def _text(self, final: bool) -> bool:
        starts = [i for i in (self._buf.find(OPEN), self._buf.find(FUNC)) if i >= 0]
        if not starts:
            cut = len(self._buf) if final else len(self._buf) - _held(self._buf, (OPEN, FUNC))
            head = self._skip(self._consume(cut))
            text = head if final else head.rstrip()
            self._out.append(text)
            self._buf = head[len(text):] + self._buf  # whitespace that may precede a call
            return False
        start = min(starts)
        head = self._skip(self._consume(start))
        text = head.rstrip()
        self._out.append(text)
        self._held_space = head[len(text):]
        self._implicit = not self._buf.startswith(OPEN)
        self._raw = "" if self._implicit else self._consume(len(OPEN))
        self._state = self._head
        return True

    def _skip(self, text: str) -> str:
        if self._skip_space:
            text = text.lstrip()
            self._skip_space = not text
        return text

    def _end_block(self) -> None:
        self._state, self._raw, self._held_space, self._skip_space = self._text, "", "", True

    # -- a block before its function header ---------------------------------------------------

    def _head(self, final: bool) -> bool:
        stripped = self._buf.lstrip()
        self._raw += self._consume(len(self._buf) - len(stripped))
        if self._buf.startswith(FUNC):
            header = _header(self._buf, final)
            if header is None:
                return False
            end, name = header
            if name is not None:
                self._consume(end)
                self._raw = ""
                self._open_call(name)
                return True
        elif not final and _may_become(self._buf, (FUNC, CLOSE)):
            return False
        self._state = self._bad
        return True

    def _bad(self, final: bool) -> bool:
        """A block with no function header: it stays content, with an error record."""
        if self._implicit:  # `<function=` in prose that is no call: plain text
            self._out.append(self._skip(self._held_space + self._consume(len(FUNC))))
            self._state, self._held_space = self._text, ""
            return True
        end = self._buf.find(CLOSE)
        if end < 0 and not final:
            return False
        body = self._consume(len(self._buf) if end < 0 else end)
        close = self._consume(len(CLOSE)) if end >= 0 else ""
        call, error = call_from_json(self._raw[len(OPEN):] + body, self._n_calls, self._id_prefix)
        if call:
            self._deltas.append({"index": self._n_calls, **call})
            self._n_calls += 1
            self._end_block()
            return True
        block = self._raw + body + close
        self._errors.append({"text": block, "error": f"no <function=NAME> in the tool call ({error})"})
        self._out.append(self._skip(self._held_space + block))
        self._state, self._raw, self._held_space = self._text, "", ""
        return True

    # -- inside a call ------------------------------------------------------------------------

    def _open_call(self, name: str) -> None:
        self._call = {"index": self._n_calls, "names": set(), "types": self._types.get(name, {}), "stray": ""}
        self._deltas.append({"index": self._n_calls, "id": f"{self._id_prefix}{self._n_calls}", "type": "function",
                             "function": {"name": name, "arguments": ""}})
        self._n_calls += 1
        self._held_space = ""
        self._state = self._in_call

    def _args(self, piece: str) -> None:
        self._deltas.append({"index": self._call["index"], "function": {"arguments": piece}})

    def _in_call(self, final: bool) -> bool:
        tag = next((t for t in CALL_TAGS if self._buf.startswith(t)), None)
        if tag is None:
            if not self._buf:
                if final:
                    self._close_call()
                    self._end_block()
                return False
            if self._buf[0] == "<" and not final and _may_become(self._buf, CALL_TAGS):
                return False
            lt = self._buf.find("<", 1)
            self._call["stray"] += self._consume(len(self._buf) if lt < 0 else lt)
            return True
        self._flush_stray()
        if tag == PARAM:
            return self._open_param(final)
        self._close_call()
        if tag == FUNC_END:
            self._consume(len(FUNC_END))
            self._state = self._after
        elif tag == CLOSE:
            self._consume(len(CLOSE))
            self._end_block()
        else:
            self._state = self._head
        return True

    def _flush_stray(self) -> None:
        stray, self._call["stray"] = self._call["stray"], ""
        if stray.strip():
            self._errors.append({"text": stray, "error": "text between a call's parameters, ignored"})

    def _close_call(self) -> None:
        self._flush_stray()
        self._args("}" if self._call["names"] else "{}")

    def _after(self, final: bool) -> bool:
        """After </function>: its </tool_call>, another <function=, or (no <tool_call>) text."""
        stripped = self._buf.lstrip()
        if not stripped and not final:
            return False
        if stripped.startswith(CLOSE) or stripped.startswith(FUNC):
            self._consume(len(self._buf) - len(stripped))
            if stripped.startswith(CLOSE):
                self._consume(len(CLOSE))
                self._end_block()
            else:
                self._state = self._head
            return True
        if not final and _may_become(stripped, (CLOSE, FUNC)):
            return False
        self._end_block()  # an unclosed block ends here; what follows is content
        return bool(self._buf)

    # -- a parameter --------------------------------------------------------------------------

    def _open_param(self, final: bool) -> bool:
        header = _header(self._buf, final)
        if header is None:
            return False
        end, name = header
        raw = self._consume(end)
        call = self._call
        problem = "no name" if name is None and raw.endswith(">") else "no `>` after the name" if name is None \
            else f"repeated parameter {name!r}" if name in call["names"] else None
        self._param = {"name": name, "raw": raw, "problem": problem, "text": [], "lead": self._framed and problem is None,
                       "types": call["types"].get(name, frozenset()), "tail": ""}
        if problem is None and is_text(self._param["types"]):
            self._args(self._key(name) + '"')
        self._state = self._value
        return True

    def _key(self, name: str) -> str:
        sep = ", " if self._call["names"] else "{"
        self._call["names"].add(name)
        return sep + json.dumps(name, ensure_ascii=False) + ": "

    def _value(self, final: bool) -> bool:
        p = self._param
        if p["lead"] and (self._buf or final):
            p["lead"] = False
            if self._buf.startswith("\n"):
                self._consume(1)
        ends = [(i, t) for t in VALUE_ENDS if (i := self._buf.find(t)) >= 0]
        if ends:
            i, tag = min(ends)
            self._take_value(self._unframed(self._consume(i)))
            if tag == PARAM_END:
                self._consume(len(PARAM_END))
            self._end_param()
            return True
        if final:  # cut short: a closing tag begun at the very end is dropped
            self._take_value(self._unframed(self._consume(len(self._buf) - _held(self._buf, VALUE_ENDS))))
            self._buf = ""
            self._end_param()
            return True
        safe = len(self._buf) - _held(self._buf, VALUE_ENDS)
        if self._framed and safe and self._buf[safe - 1] == "\n":
            safe -= 1  # may be the newline before the closing tag
        self._take_value(self._consume(safe))
        return False

    def _unframed(self, text: str) -> str:
        """The value's last piece less the newline the template puts before the closing tag."""
        return text[:-1] if self._framed and text.endswith("\n") else text

    def _take_value(self, text: str) -> None:
        p = self._param
        p["raw"] += text
        if p["problem"] is None and is_text(p["types"]):
            if text:
                self._args(json.dumps(text, ensure_ascii=False)[1:-1])
        else:
            p["text"].append(text)

    def _end_param(self) -> None:
        p = self._param
        if p["problem"] is not None:
            self._errors.append({"text": p["raw"], "error": f"malformed parameter ({p['problem']}), skipped"})
        elif is_text(p["types"]):
            self._args('"')
        else:
            value, error = convert("".join(p["text"]), p["types"])
            self._args(self._key(p["name"]) + json.dumps(value, ensure_ascii=False))
            if error:
                self._errors.append({"text": p["raw"], "error": f"parameter {p['name']!r}: {error}"})
        self._state = self._in_call
