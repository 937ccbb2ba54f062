"""SamplingParams: how one request picks its tokens and when it stops (plain Python, validated).

Temperature 0 is greedy, and so is any temperature below GREEDY_BELOW: dividing logits by
1e-40 overflows them, and the draw then lands on arbitrary tokens (vLLM draws the same line).
Qwen's recommended settings (from the model cards):

| model / mode                 | temperature | top_p | top_k | min_p | other                     |
|------------------------------|-------------|-------|-------|-------|---------------------------|
| Qwen2.5 / Qwen2.5-Coder      | 0.7         | 0.8   | 20    | 0     | repetition_penalty 1.05   |
| Qwen3, thinking mode         | 0.6         | 0.95  | 20    | 0     | never greedy (it repeats) |
| Qwen3, non-thinking mode     | 0.7         | 0.8   | 20    | 0     | presence_penalty 0-1.5 if it repeats |

`SamplingParams.qwen_recommended(thinking=...)` returns the Qwen3 rows (add
repetition_penalty=1.05 for Qwen2.5). docs/serving.md has the same table.

`structured` (a `StructuredOutputs`) constrains the answer to a JSON schema, any JSON object, a
regex, one of a list of strings, or a Lark / GBNF grammar; `thinking_budget` caps a thinking
model's reasoning in tokens. The engine enforces both (engine/structured.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from numbers import Real

from ..errors import RequestError

MAX_TOP_LOGPROBS = 20
GREEDY_BELOW = 1e-5
MAX_SPECULATIVE_TOKENS = 15  # proposals a step: with the sequence's own token, the fused step's 16 rows
REAL_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0  # 0 or -1: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # >1 discourages every token seen (prompt and output), HF style
    presence_penalty: float = 0.0  # OpenAI style, over output tokens
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings, not included in the text
    stop_token_ids: tuple[int, ...] = ()  # besides the model's EOS ids; included in token_ids
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's logprob and the top k
    skip_special_tokens: bool = True
    structured: "StructuredOutputs | None" = None  # the answer follows this grammar
    thinking_budget: int | None = None  # reasoning tokens before the thought is closed for it
    speculative: "SpeculativeParams | None" = None  # guess and verify tokens (same output, fewer steps)

    def __post_init__(self):
        object.__setattr__(self, "stop", _as_tuple(self.stop, str, "stop"))
        object.__setattr__(self, "stop_token_ids", _as_tuple(self.stop_token_ids, int, "stop_token_ids"))
        object.__setattr__(self, "logit_bias", {int(k): float(v) for k, v in (self.logit_bias or {}).items()})
        _check(self)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def replace(self, **changes) -> "SamplingParams":
        return replace(self, **changes)

    @classmethod
    def qwen_recommended(cls, thinking: bool = False, **changes) -> "SamplingParams":
        base = dict(temperature=0.6, top_p=0.95, top_k=20) if thinking else dict(temperature=0.7, top_p=0.8, top_k=20)
        return cls(**{**base, **changes})


@dataclass(frozen=True)
class SpeculativeParams:
    """Speculative decoding for one request, named as vLLM's `speculative_config`: `method` "ngram"
    (prompt lookup: the continuation of the latest earlier occurrence of the last n tokens, n from
    prompt_lookup_max down to prompt_lookup_min) or "mtp" (the model's own multi-token-prediction
    head: Qwen3-Next, Qwen3.5), up to `num_speculative_tokens` guesses a step."""
    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2

    def __post_init__(self):
        rules = [(self.method in ("ngram", "mtp"),
                  f"speculative.method: {self.method!r} is not served; expected 'ngram' or 'mtp'"),
                 (_is_int(self.num_speculative_tokens) and 1 <= self.num_speculative_tokens <= MAX_SPECULATIVE_TOKENS,
                  f"speculative.num_speculative_tokens must be an integer in [1, {MAX_SPECULATIVE_TOKENS}]"),
                 (_is_int(self.prompt_lookup_min) and self.prompt_lookup_min >= 1,
                  "speculative.prompt_lookup_min must be an integer >= 1"),
                 (_is_int(self.prompt_lookup_max) and self.prompt_lookup_max >= self.prompt_lookup_min,
                  "speculative.prompt_lookup_max must be an integer >= prompt_lookup_min")]
        for ok, message in rules:
            if not ok:
                raise RequestError(message)


@dataclass(frozen=True)
class StructuredOutputs:
    """What the answer must be: exactly one of a JSON schema (`json`, a dict or its JSON text),
    any JSON object (`json_object`), a regex, one of `choice`, or a `grammar` (Lark; GBNF when it
    uses `::=`). `strict`: a schema keyword the library cannot enforce is an error, not ignored."""
    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    strict: bool = False
    origin: str | None = field(default=None, compare=False)  # the field errors name (the server's)

    def __post_init__(self):
        if self.choice is not None:
            object.__setattr__(self, "choice", _as_tuple(self.choice, str, "choice"))
            if not self.choice:
                raise RequestError("choice must list at least one string")
        given = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise RequestError("structured outputs take exactly one of json, json_object, regex, choice, "
                               f"grammar (got {', '.join(given) or 'none'})")

    @property
    def kind(self) -> str:
        return next(k for k in ("json", "regex", "choice", "grammar", "json_object")
                    if getattr(self, k) not in (None, False))


def _as_tuple(value, kind, name: str) -> tuple:
    if value is None:
        return ()
    if isinstance(value, kind):
        value = (value,)
    value = tuple(value)
    if not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
        raise RequestError(f"{name} must be a {kind.__name__} or a list of them")
    return value


def _check(p: SamplingParams) -> None:
    # Types first, so NaN, infinities and strings fail with a RequestError rather than slip past
    # (NaN compares false) or raise a TypeError from a comparison below.
    for name in REAL_FIELDS:
        value = getattr(p, name)
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            raise RequestError(f"{name} must be a finite number, got {value!r}")
    rules = [
        (_is_int(p.max_tokens) and p.max_tokens >= 1, "max_tokens must be an integer >= 1"),
        (p.temperature >= 0, "temperature must be >= 0"),
        (_is_int(p.top_k) and p.top_k >= -1, "top_k must be an integer >= -1 (0 or -1 turn it off)"),
        (0 < p.top_p <= 1, "top_p must be in (0, 1]"),
        (0 <= p.min_p <= 1, "min_p must be in [0, 1]"),
        (p.repetition_penalty > 0, "repetition_penalty must be > 0"),
        (-2 <= p.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
        (-2 <= p.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
        (all(-100 <= b <= 100 for b in p.logit_bias.values()), "logit_bias values must be in [-100, 100]"),
        (p.seed is None or _is_int(p.seed) and -2**63 <= p.seed < 2**64, "seed must be an integer in [-2**63, 2**64)"),
        (p.logprobs is None or 0 <= p.logprobs <= MAX_TOP_LOGPROBS, f"logprobs must be in [0, {MAX_TOP_LOGPROBS}]"),
        (all(s for s in p.stop), "stop strings must not be empty"),
        (p.thinking_budget is None or _is_int(p.thinking_budget) and p.thinking_budget >= 0,
         "thinking_budget must be an integer >= 0"),
        (p.structured is None or isinstance(p.structured, StructuredOutputs),
         "structured must be a StructuredOutputs"),
        (p.speculative is None or isinstance(p.speculative, SpeculativeParams),
         "speculative must be a SpeculativeParams"),
        (p.speculative is None or p.structured is None and p.thinking_budget is None,
         "speculative decoding does not combine with structured outputs or a thinking budget"),
    ]
    for ok, message in rules:
        if not ok:
            raise RequestError(message)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
