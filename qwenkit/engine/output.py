"""What the engine hands back per request and step, and the text side of a request (stop strings).

`IncrementalText` turns a request's tokens into text as they come. It holds back the tail that
could still be the start of a stop string, so streamed text never has to be taken back; when a
stop string appears, the text ends just before it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestOutput:
    """One step's news for one request (`token_ids`, `text` are what is new since the last one)."""
    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length" or "abort"
    error: Exception | None = None  # why the engine aborted the request, when its step failed
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache


class IncrementalText:
    def __init__(self, decoder, stop: tuple[str, ...] = ()):
        self.decoder = decoder  # a tokenizer's StreamDecoder
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1  # chars that may start a stop string
        self.pending = ""  # decoded but not yet handed out
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Text that became final with this token; sets `stopped` when a stop string appeared."""
        if self.stopped:
            return ""
        self.pending += self.decoder.push(token_id)
        return self._release(final=False)

    def finish(self) -> str:
        if not self.stopped:
            self.pending += self.decoder.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stop and not self.stopped:
            cut = min((i for i in (self.pending.find(s) for s in self.stop) if i >= 0), default=-1)
            if cut >= 0:
                self.pending, self.stopped, final = self.pending[:cut], True, True
        split = len(self.pending) if final else max(0, len(self.pending) - self.hold)
        out, self.pending = self.pending[:split], self.pending[split:]
        return out
