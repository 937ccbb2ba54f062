"""Structured outputs and the thinking budget: what the sampler may pick for a guided request.

Grammars go through llguidance (why that library: docs/serving.md), imported on first use so
`import qwenkit` stays core-only. `Guidance` (one per engine) holds the vocabulary in
llguidance's form and the compiled grammars; each guided sequence gets a `Guide` that follows
its tokens through three phases:

  start      a thinking model may open `<think>` here; any other token begins the answer
  reasoning  unconstrained, counted against `thinking_budget`; once spent (or when only the
             room for the closing is left under max_tokens) the guide forces CLOSE_THINKING,
             Qwen's early-stop sentence and `</think>`, one token a step
  answer     the grammar's token mask; with a budget and no grammar, end-of-sequence is held
             back until the answer has a visible character, so the content is never empty

The constraint starts after `</think>`. Forced tokens are the one mechanism for text the engine
writes itself: the sampler takes a guide's forced token instead of drawing.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict, deque

import numpy as np
import torch

from ..errors import RequestError
from .sampling_params import SamplingParams, StructuredOutputs

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CLOSE_THINKING = ("\n\nConsidering the limited time by the user, I have to give the solution based on the "
                  "thinking directly now.\n</think>\n\n")
ASSISTANT_HEADER = "<|im_start|>assistant\n"  # where Qwen's chat template leaves the model to answer
MAX_CACHED_GRAMMARS = 256
# Whitespace between JSON tokens is free (models indent), but bounded: a small model that loops on
# newlines must still reach the end of the object. A schema's "x-guidance" can override it.
JSON_OPTIONS = {"whitespace_pattern": r"[\x20\x0A\x0D\x09]{0,32}"}


class Guidance:
    """The grammar side of one engine: its tokenizer's vocabulary and a cache of compiled grammars."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids=()):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.eos_token_ids = list(eos_token_ids or tokenizer.eos_token_ids)
        self.think_open = tokenizer.special_tokens.get(THINK_OPEN)
        self.think_close = tokenizer.special_tokens.get(THINK_CLOSE)
        self.thinks = self.think_open is not None and self.think_close is not None
        self.close_ids = tokenizer.encode(CLOSE_THINKING) if self.thinks else []
        self.assistant_header = tokenizer.encode(ASSISTANT_HEADER) if "<|im_start|>" in tokenizer.special_tokens else []
        self._lock = threading.Lock()
        self._compiled: OrderedDict[str, object] = OrderedDict()  # key -> a matcher at its start
        self._ll_tokenizer = None

    def ll_tokenizer(self):
        """llguidance's view of the vocabulary (built once, ~2 s for Qwen's 151K tokens)."""
        with self._lock:
            if self._ll_tokenizer is None:
                import llguidance

                self._ll_tokenizer = llguidance.LLTokenizer(self.tokenizer.backend.to_str(), n_vocab=self.vocab_size,
                                                            eos_token=self.eos_token_ids)
            return self._ll_tokenizer

    def check(self, params: SamplingParams) -> None:
        """RequestError naming the problem if the request's constraint cannot be enforced."""
        if params.structured is not None:
            self.matcher(params.structured)
        if params.thinking_budget is not None and self.thinks and params.max_tokens < len(self.close_ids) + 2:
            raise RequestError(f"max_tokens ({params.max_tokens}) leaves no room to close the thought and "
                               f"answer: a thinking_budget needs max_tokens >= {len(self.close_ids) + 2}")

    def matcher(self, spec: StructuredOutputs):
        """A fresh llguidance matcher for the spec (compiled once, then copied)."""
        key = json.dumps([spec.kind, getattr(spec, spec.kind), spec.strict], sort_keys=True, default=list)
        with self._lock:
            start = self._compiled.get(key)
            if start is not None:
                self._compiled.move_to_end(key)
                return start.deep_copy()
        start = self._compile(spec)
        with self._lock:
            self._compiled[key] = start
            while len(self._compiled) > MAX_CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
        return start.deep_copy()

    def _compile(self, spec: StructuredOutputs):
        import llguidance

        where = spec.origin or f"structured.{spec.kind}"
        try:
            grammar = grammar_text(spec)
        except ValueError as e:
            raise RequestError(f"{where}: {e}") from None
        matcher = llguidance.LLMatcher(self.ll_tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise RequestError(f"{where}: {_first_line(matcher.get_error())}")
        return matcher

    def guide(self, seq) -> "Guide | None":
        """The guide for a sequence whose settings ask for one, else None."""
        p = seq.params
        if p.structured is None and p.thinking_budget is None:
            return None
        matcher = self.matcher(p.structured) if p.structured is not None else None
        return Guide(self, matcher, self.first_phase(seq.token_ids[:seq.num_prompt_tokens]), p)

    def first_phase(self, prompt_ids: list[int]) -> str:
        """"reasoning" if the prompt left `<think>` open; "start" if it ends with the chat template's
        assistant header (the model may open a thought); else "answer" (a raw completion, or
        thinking turned off: the prompt closed the thought itself)."""
        if not self.thinks:
            return "answer"
        opened, closed = _last_index(prompt_ids, self.think_open), _last_index(prompt_ids, self.think_close)
        if opened > closed:
            return "reasoning"
        header = self.assistant_header
        return "start" if header and prompt_ids[-len(header):] == header else "answer"


def grammar_text(spec: StructuredOutputs) -> str:
    """llguidance's grammar for a spec; ValueError for input that is not a schema or grammar at all."""
    from llguidance import LLMatcher
    from llguidance.gbnf_to_lark import any_to_lark

    if spec.kind == "json":
        schema = json.loads(spec.json) if isinstance(spec.json, str) else spec.json
        if not isinstance(schema, dict):
            raise ValueError("a JSON schema is an object")
        # Strict: a keyword llguidance cannot enforce is an error; otherwise it is ignored.
        options = JSON_OPTIONS if spec.strict else {**JSON_OPTIONS, "lenient": True}
        return LLMatcher.grammar_from_json_schema(schema, defaults=options)
    if spec.kind == "json_object":
        return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    if spec.kind == "regex":
        return LLMatcher.grammar_from_regex(spec.regex)
    if spec.kind == "choice":
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec.choice))
    try:
        lark = any_to_lark(spec.grammar)  # GBNF (llama.cpp's `root ::= ...`) becomes Lark; Lark stays
    except Exception as e:  # the converter raises assorted types for a malformed grammar
        raise ValueError(f"not a valid Lark or GBNF grammar: {e}") from None
    return LLMatcher.grammar_from_lark(lark)


class Guide:
    """One sequence's constraint: which phase it is in, its matcher, the tokens it must emit next."""

    def __init__(self, guidance: Guidance, matcher, phase: str, params: SamplingParams):
        self.guidance, self.matcher, self.phase = guidance, matcher, phase
        self.budget, self.max_tokens = params.thinking_budget, params.max_tokens
        self.stop_ids = [*guidance.eos_token_ids, *params.stop_token_ids]
        self.forced: deque[int] = deque()
        self.closing = False  # the close of the thought is being forced
        self.reasoning_tokens = 0
        self.num_seen = 0  # output tokens followed so far
        self.answered = params.thinking_budget is None  # the answer has a visible character

    def sync(self, seq) -> None:
        """Follow the tokens the sequence gained since the last call (its own, not our guesses)."""
        for token in seq.token_ids[seq.num_prompt_tokens + self.num_seen:]:
            self._accept(token)
        self.num_seen = seq.num_output_tokens

    def _accept(self, token: int) -> None:
        forced = bool(self.forced) and self.forced[0] == token
        if forced:
            self.forced.popleft()
        if self.phase == "start":
            if token == self.guidance.think_open:
                self.phase = "reasoning"
                return
            self.phase = "answer"
        if self.phase == "reasoning":
            if token == self.guidance.think_close:
                self.phase = "answer"
            else:
                self.reasoning_tokens += 1
            return
        if forced:  # the newlines after a forced `</think>` are ours, not the grammar's
            return
        if self.matcher is not None:
            self.matcher.consume_token(token)
        if not self.answered:
            self.answered = bool(self.guidance.tokenizer.decode([token]).strip())

    def forced_token(self) -> int | None:
        if self.phase == "reasoning" and self.budget is not None and not self.closing:
            room = self.max_tokens - self.num_seen - len(self.guidance.close_ids) - 1
            if self.reasoning_tokens >= self.budget or room <= 0:
                self.closing = True
                self.forced.extend(self.guidance.close_ids)
        return self.forced[0] if self.forced else None

    @property
    def masked(self) -> bool:
        return self.matcher is not None and self.phase != "reasoning"

    def fill(self, row: torch.Tensor) -> None:
        """Write the allowed tokens into a bitmask row (W,) int32 (bit t % 32 of word t // 32)."""
        if self.matcher.is_error():  # cannot happen for tokens we allowed; end the request if it does
            row.zero_()
            for t in self.guidance.eos_token_ids:
                row[t // 32] |= _bit(t)
            return
        self.matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())
        if self.phase == "start" and self.guidance.thinks:
            t = self.guidance.think_open
            row[t // 32] |= _bit(t)

    def banned(self) -> list[int]:
        """Tokens that may not come now: the end of a budgeted thought (it is closed for the
        request instead, and an answer follows) or of a still-empty answer (no grammar)."""
        if self.budget is not None and self.phase == "reasoning":
            return self.stop_ids
        if self.phase == "answer" and not self.answered and self.matcher is None:
            return self.stop_ids
        return []


def allowed_tokens(bits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(R, W) int32 bitmasks -> (R, vocab_size) bool. numpy's unpackbits writes one byte a token in
    one C pass (0.2 ms for 8 rows of Qwen's vocabulary, where shifting (R, W, 32) int32 tensors
    took 1-100 ms on a busy 2-core host); the words are read as little-endian bytes, so bit t of
    the mask is bit t % 8 of byte t // 8 on any host."""
    as_bytes = bits.numpy().astype("<i4", copy=False).view(np.uint8)  # (R, 4W)
    return torch.from_numpy(np.unpackbits(as_bytes, axis=1, count=vocab_size, bitorder="little")).view(torch.bool)


def _bit(t: int) -> int:
    bit = 1 << (t % 32)
    return bit - (1 << 32) if bit >= 1 << 31 else bit  # as a signed int32


def _last_index(ids: list[int], token: int) -> int:
    for i in range(len(ids) - 1, -1, -1):
        if ids[i] == token:
            return i
    return -1


def _first_line(text: str) -> str:
    return " ".join(line.strip() for line in text.strip().splitlines()[:3])
