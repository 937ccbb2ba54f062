"""Qwen3 reasoning: `<think>…</think>` at the start of a reply becomes `reasoning_content`.

`split_reasoning` is the rule; `ReasoningStream` applies it to text arriving in chunks and
emits only what no later text can change, so its pieces join to exactly `split_reasoning`'s
result however the text is cut. When the prompt already opened `<think>` (Qwen3 thinking
templates), pass `started_in_reasoning=True`: the reply starts inside the reasoning.
"""

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def split_reasoning(text: str, started_in_reasoning: bool = False) -> tuple[str | None, str]:
    """(reasoning or None, content). Newlines around the reasoning and before the content are
    dropped, as the Qwen3 template drops them when it renders the turn back."""
    if not started_in_reasoning:
        stripped = text.lstrip()
        if not stripped.startswith(THINK_OPEN):
            return None, text
        text = stripped[len(THINK_OPEN):]
    reasoning, _, content = text.partition(THINK_CLOSE)
    return reasoning.strip("\n"), content.lstrip("\n")


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that could be the start of `tag`."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ReasoningStream:
    """Feed text chunks; each call returns (reasoning delta, content delta)."""

    def __init__(self, started_in_reasoning: bool = False):
        self._state = "reasoning" if started_in_reasoning else "detect"
        self._buf = ""
        self._reasoning_started = False  # leading newlines of the reasoning are dropped
        self._content_started = False  # leading newlines of the content are dropped
        self.saw_reasoning = started_in_reasoning

    def feed(self, chunk: str) -> tuple[str, str]:
        self._buf += chunk
        reasoning, content = "", ""
        if self._state == "detect":
            content += self._detect()
        if self._state == "reasoning":
            reasoning += self._reasoning()
        if self._state == "content":
            content += self._content()
        if self._state == "plain":
            content += self._take(len(self._buf))
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """End of text: release what was held back."""
        if self._state in ("detect", "plain"):
            return "", self._take(len(self._buf))
        if self._state == "reasoning":  # never closed: all of it is reasoning
            return self._emit_reasoning(self._take(len(self._buf)).rstrip("\n")), ""
        return "", self._content()

    def _detect(self) -> str:
        stripped = self._buf.lstrip()
        if stripped.startswith(THINK_OPEN):
            self._state, self.saw_reasoning = "reasoning", True
            self._buf = stripped[len(THINK_OPEN):]
        elif stripped and not THINK_OPEN.startswith(stripped):
            self._state = "plain"  # no reasoning block: the text is content, untouched
        return ""

    def _reasoning(self) -> str:
        end = self._buf.find(THINK_CLOSE)
        if end >= 0:
            text = self._take(end).rstrip("\n")
            self._buf = self._buf[len(THINK_CLOSE):]
            self._state = "content"
            return self._emit_reasoning(text)
        # Hold back what may be the start of </think>, and newlines that may precede it.
        safe = len(self._buf) - partial_suffix(self._buf, THINK_CLOSE)
        safe = len(self._buf[:safe].rstrip("\n"))
        return self._emit_reasoning(self._take(safe))

    def _emit_reasoning(self, text: str) -> str:
        if not self._reasoning_started:
            text = text.lstrip("\n")
            self._reasoning_started = bool(text)
        return text

    def _content(self) -> str:
        text = self._take(len(self._buf))
        if not self._content_started:
            text = text.lstrip("\n")
            self._content_started = bool(text)
        return text

    def _take(self, n: int) -> str:
        head, self._buf = self._buf[:n], self._buf[n:]
        return head
