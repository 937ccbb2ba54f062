"""A model reply parsed into OpenAI message fields: reasoning first, then tool calls in the rest.

`parse_output` handles a finished reply; `OutputStream` the same reply in chunks, returning
deltas whose concatenation (content, reasoning) and union (tool calls, errors) equal
`parse_output` of the whole text, however it was cut. Tool calls inside the reasoning are
thoughts, not calls, so they stay in the reasoning.
"""

from dataclasses import dataclass, field

from .reasoning import ReasoningStream, split_reasoning
from .tools import ToolCallStream, parse_tool_calls


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
    tool_calls: list[dict] = field(default_factory=list)  # complete calls, each once
    errors: list[dict] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning_content or self.tool_calls or self.errors)


def parse_output(text: str, reasoning: bool = True, tools: bool = True,
                 started_in_reasoning: bool = False, id_prefix: str = "call_") -> ParsedOutput:
    thought, content = split_reasoning(text, started_in_reasoning) if reasoning else (None, text)
    out = ParsedOutput(content=content, reasoning_content=thought or None)
    if tools:
        out.content, out.tool_calls, out.errors = parse_tool_calls(content, id_prefix)
    return out


class OutputStream:
    """Feed reply chunks (e.g. `StreamDecoder` pieces); each call returns an `OutputDelta`."""

    def __init__(self, reasoning: bool = True, tools: bool = True,
                 started_in_reasoning: bool = False, id_prefix: str = "call_"):
        self._reasoning = ReasoningStream(started_in_reasoning) if reasoning else None
        self._tools = ToolCallStream(id_prefix) if tools else None

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
    out.tool_calls = [c for d in deltas for c in d.tool_calls]
    out.errors = [e for d in deltas for e in d.errors]
    return out
