"""A model reply parsed into OpenAI message fields: reasoning first, then tool calls in the rest.

`parse_output` handles a finished reply; `OutputStream` the same reply in chunks, returning
deltas whose concatenation (content, reasoning, each call's arguments) and union (errors) equal
`parse_output` of the whole text, however it was cut. Tool calls inside the reasoning are
thoughts, not calls, so they stay in the reasoning.

Tool calls come in one of the `TOOL_FORMATS`, chosen from the chat template (`tool_format`):
"json" (`<tool_call>{"name": ...}</tool_call>`, Qwen2.5 and Qwen3; tools.py) or "xml"
(`<function=NAME><parameter=ARG>`, Qwen3-Coder and Qwen3.5; tool_xml.py), whose values are
framed by newlines as those templates write them ("xml_literal" where a template does not).
"""

import re
from dataclasses import dataclass, field

from .reasoning import ReasoningStream, split_reasoning
from .tool_xml import XmlToolCallStream, parse_xml_tool_calls
from .tools import ToolCallStream, merge_tool_deltas, parse_tool_calls

# format -> (whole-text parser, stream factory); both take (tools, id_prefix)
TOOL_FORMATS = {
    "json": (lambda text, tools, prefix: parse_tool_calls(text, prefix), lambda tools, prefix: ToolCallStream(prefix)),
    "xml": (lambda text, tools, prefix: parse_xml_tool_calls(text, tools, prefix),
            lambda tools, prefix: XmlToolCallStream(tools, prefix)),
    "xml_literal": (lambda text, tools, prefix: parse_xml_tool_calls(text, tools, prefix, framed=False),
                    lambda tools, prefix: XmlToolCallStream(tools, prefix, framed=False)),
}


def tool_format(chat_template: str | None) -> str:
    """The tool-call format a chat template teaches its model (a key of TOOL_FORMATS)."""
    template = chat_template or ""
    if "<function=" not in template or "<parameter=" not in template:
        return "json"
    # The Qwen templates write `'\n</parameter>'`: a value sits between two newlines.
    return "xml" if re.search(r"(\\n|\n)</parameter>", template) else "xml_literal"


@dataclass
class ParsedOutput:
    content: str = ""
    reasoning_content: str | None = None
    tool_calls: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)  # malformed tool-call blocks, kept in content

    def to_message(self) -> dict:
        """The OpenAI assistant message (content None when the reply is only tool calls)."""
        message = {"role": "assistant", "content": self.content or None}
        if self.reasoning_content:
            message["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        return message


@dataclass
class OutputDelta:
    content: str = ""
    reasoning_content: str = ""
    tool_calls: list[dict] = field(default_factory=list)  # OpenAI stream deltas, each with its call's index
    errors: list[dict] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning_content or self.tool_calls or self.errors)


def parse_output(text: str, reasoning: bool = True, tools: bool | list[dict] = True,
                 started_in_reasoning: bool = False, id_prefix: str = "call_",
                 tool_format: str = "json") -> ParsedOutput:
    """`tools`: whether to parse tool calls, or the request's tools (their schemas type XML
    arguments)."""
    thought, content = split_reasoning(text, started_in_reasoning) if reasoning else (None, text)
    out = ParsedOutput(content=content, reasoning_content=thought or None)
    if tools:
        parse = TOOL_FORMATS[tool_format][0]
        out.content, out.tool_calls, out.errors = parse(content, _schemas(tools), id_prefix)
    return out


def _schemas(tools) -> list[dict] | None:
    return tools if isinstance(tools, list) else None


class OutputStream:
    """Feed reply chunks (e.g. `StreamDecoder` pieces); each call returns an `OutputDelta`."""

    def __init__(self, reasoning: bool = True, tools: bool | list[dict] = True,
                 started_in_reasoning: bool = False, id_prefix: str = "call_", tool_format: str = "json"):
        self._reasoning = ReasoningStream(started_in_reasoning) if reasoning else None
        self._tools = TOOL_FORMATS[tool_format][1](_schemas(tools), id_prefix) if tools else None

    def feed(self, chunk: str) -> OutputDelta:
        thought, content = self._reasoning.feed(chunk) if self._reasoning else ("", chunk)
        return self._content(thought, content, final=False)

    def finish(self) -> OutputDelta:
        thought, content = self._reasoning.finish() if self._reasoning else ("", "")
        return self._content(thought, content, final=True)

    def _content(self, thought: str, content: str, final: bool) -> OutputDelta:
        if not self._tools:
            return OutputDelta(content, thought)
        text, calls, errors = self._tools.feed(content)
        if final:
            rest, more_calls, more_errors = self._tools.finish()
            text, calls, errors = text + rest, calls + more_calls, errors + more_errors
        return OutputDelta(text, thought, calls, errors)


def collect(deltas: list[OutputDelta]) -> ParsedOutput:
    """Join stream deltas into the message they add up to."""
    out = ParsedOutput()
    reasoning = "".join(d.reasoning_content for d in deltas)
    out.content = "".join(d.content for d in deltas)
    out.reasoning_content = reasoning or None
    out.tool_calls = merge_tool_deltas([c for d in deltas for c in d.tool_calls])
    out.errors = [e for d in deltas for e in d.errors]
    return out
