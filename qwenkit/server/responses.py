"""OpenAI response bodies (chat completions, text completions), whole and as stream chunks.

A `Reply` holds what one choice of a request needs to shape its answer: ids, model name, the
tokenizer (token strings for logprobs), its index and counts; `for_choice(k)` makes the others
(same id), `total_usage` counts the prompt once and the tokens of every choice.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from ..engine.output import RequestOutput


@dataclass
class Reply:
    kind: str  # "chat" or "text"
    model: str
    tokenizer: object
    num_prompt_tokens: int
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    finish_reason: str | None = None
    num_tool_calls: int = 0
    index: int = 0  # of the choice, when a request asks for n of them

    def __post_init__(self):
        self.id = self.id or ("chatcmpl-" if self.kind == "chat" else "cmpl-") + uuid.uuid4().hex

    def for_choice(self, index: int) -> "Reply":
        return Reply(self.kind, self.model, self.tokenizer, self.num_prompt_tokens, self.id, self.created,
                     index=index)

    def record(self, out: RequestOutput) -> None:
        self.num_output_tokens, self.num_cached_tokens = out.num_output_tokens, out.num_cached_tokens
        if out.finished:
            self.finish_reason = out.finish_reason

    def final_reason(self) -> str | None:
        return "tool_calls" if self.num_tool_calls and self.finish_reason == "stop" else self.finish_reason

    def usage(self) -> dict:
        return {"prompt_tokens": self.num_prompt_tokens, "completion_tokens": self.num_output_tokens,
                "total_tokens": self.num_prompt_tokens + self.num_output_tokens,
                "prompt_tokens_details": {"cached_tokens": self.num_cached_tokens}}

    def body(self, choices: list[dict], usage: dict | None = None) -> dict:
        obj = {"chat": "chat.completion", "text": "text_completion"}[self.kind]
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}
        out["usage"] = usage or self.usage()
        return out

    def chunk(self, choice: dict | None) -> dict:
        """A stream chunk with one choice (or none: the closing usage chunk)."""
        obj = {"chat": "chat.completion.chunk", "text": "text_completion"}[self.kind]
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": [choice] if choice is not None else []}

    # -- logprobs -----------------------------------------------------------------------------

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def chat_logprobs(self, entries) -> dict | None:
        if not entries:
            return None
        return {"content": [self._chat_entry(t, lp, top) for t, lp, top in entries]}

    def _chat_entry(self, token_id: int, logprob: float, top) -> dict:
        def one(i, p):
            text = self.token_text(i)
            return {"token": text, "logprob": p, "bytes": list(text.encode("utf-8"))}
        return {**one(token_id, logprob), "top_logprobs": [one(i, p) for i, p in top or []]}

    def text_logprobs(self, entries, offset: int = 0) -> dict | None:
        if not entries:
            return None
        tokens = [self.token_text(t) for t, _, _ in entries]
        offsets = [offset + sum(len(t) for t in tokens[:k]) for k in range(len(tokens))]
        return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [{self.token_text(i): p for i, p in top or []} for _, _, top in entries],
                "text_offset": offsets}


def total_usage(replies: list[Reply]) -> dict:
    """Usage of a request's choices: the prompt once, every choice's tokens (cached: choice 0's)."""
    usage = replies[0].usage()
    completion = sum(r.num_output_tokens for r in replies)
    usage.update(completion_tokens=completion, total_tokens=usage["prompt_tokens"] + completion)
    return usage
