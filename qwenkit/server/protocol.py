"""Request schemas of the OpenAI-compatible API, and their translation to SamplingParams.

Types are strict (HTTP 400 naming the field): `max_tokens: "10"` or `true` is not an integer,
`Infinity` not a number, and integers must fit in int64; JSON nested deeper than MAX_DEPTH
levels anywhere in a body is refused before it reaches the chat template. Values out of range
are refused by SamplingParams (RequestError, HTTP 400). Unknown fields are ignored, as OpenAI's
API does.
Extensions in vLLM's spelling: top_k, min_p, repetition_penalty, ignore_eos, stop_token_ids,
skip_special_tokens, chat_template_kwargs (e.g. {"enable_thinking": false} for Qwen3),
structured_outputs, thinking_budget, and `speculative` (speculative decoding for this request, in
the fields of vLLM's `speculative_config`: {"method": "ngram", "num_speculative_tokens": 4}).
`response_format`, `structured_outputs` and `tool_choice`
become the engine's constraint in server/constraints.py; their own fields are checked strictly
(an unknown key inside them is a 400).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from ..engine.sampling_params import SamplingParams, SpeculativeParams, StructuredOutputs
from ..errors import RequestError
from . import constraints


# Deep enough for real JSON schemas; shallow enough that the recursive walks downstream
# (injection marking, Jinja, json.dumps) stay far from Python's recursion limit.
MAX_DEPTH = 64
MAX_CHOICES = 64  # n: each choice is one sequence in the engine
Int64 = Annotated[int, Field(ge=-2**63, le=2**63 - 1)]
PositiveInt = Annotated[int, Field(ge=1, le=2**63 - 1)]


class Strict(BaseModel):
    """No coercion: "10" is not an int, true not a number; NaN and infinities are refused."""
    model_config = ConfigDict(strict=True, allow_inf_nan=False)


class StreamOptions(Strict):
    include_usage: bool = False


class Exact(Strict):
    """Strict, and a key it does not know is an error (a misspelt constraint must not be dropped)."""
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class JsonSchemaFormat(Exact):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Exact):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsField(Exact):
    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class SpeculativeField(Exact):
    method: str = "ngram"
    num_speculative_tokens: Int64 = 4
    prompt_lookup_max: Int64 = 4
    prompt_lookup_min: Int64 = 2


class SamplingFields(Strict):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: PositiveInt | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: Int64 | None = None
    min_p: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[str, float] | None = None
    seed: Int64 | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[Int64] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    n: Int64 = 1
    best_of: Int64 | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsField | None = None
    thinking_budget: Annotated[int, Field(ge=0, le=2**63 - 1)] | None = None
    speculative: SpeculativeField | None = None

    @model_validator(mode="before")
    @classmethod
    def _not_too_deep(cls, data):
        path = too_deep(data)
        if path is not None:
            raise PydanticCustomError("too_deep", "{path} is nested deeper than {limit} levels",
                                      {"path": path, "limit": MAX_DEPTH})
        return data

    def sampling_params(self, max_tokens: int, logprobs: int | None, special_tokens: dict[str, int] | None = None,
                        thinking_budget: int | None = None, tool_format: str = "json") -> SamplingParams:
        """The engine's settings; `special_tokens` (the tokenizer's) and `tool_format` (the chat
        template's) shape tool-call grammars, `thinking_budget` is the server's default for
        requests that set none."""
        try:
            bias = {int(k): v for k, v in (self.logit_bias or {}).items()}
        except ValueError:
            raise RequestError("logit_bias keys must be token ids") from None
        special_tokens = special_tokens or {}
        settings = dict(
            max_tokens=max_tokens, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0, min_p=self.min_p or 0.0,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, logit_bias=bias, seed=self.seed, stop=self.stop,
            stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos, logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens, structured=self.constraint(special_tokens, tool_format),
            thinking_budget=self.thinking_budget if self.thinking_budget is not None else thinking_budget,
            speculative=None if self.speculative is None else SpeculativeParams(**self.speculative.model_dump()))
        return SamplingParams(**{**settings, **self.stop_changes(special_tokens)})

    def constraint(self, special_tokens: dict[str, int], tool_format: str = "json") -> StructuredOutputs | None:
        fmt = constraints.from_response_format(self.response_format)
        so = constraints.from_structured_outputs(self.structured_outputs)
        if fmt and so:
            raise RequestError("response_format and structured_outputs: give one of them")
        return fmt or so

    def stop_changes(self, special_tokens: dict[str, int]) -> dict:
        return {}

    def num_choices(self) -> int:
        """n, checked; best_of is refused as vLLM refuses it (n samples are returned, none ranked away)."""
        if self.best_of is not None and self.best_of != 1:
            raise RequestError("best_of is not supported: n returns n samples (rank them by their logprobs)")
        if not 1 <= self.n <= MAX_CHOICES:
            raise RequestError(f"n must be in [1, {MAX_CHOICES}]")
        return self.n

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class FunctionSpec(Strict):
    model_config = ConfigDict(extra="allow")
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(Strict):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"] = "function"
    function: FunctionSpec


class NamedToolChoice(Strict):
    type: Literal["function"] = "function"
    function: FunctionSpec


class FunctionCall(Strict):
    model_config = ConfigDict(extra="allow")
    name: str
    arguments: str | dict[str, Any] = "{}"  # OpenAI sends a JSON string; some clients an object


class ToolCall(Strict):
    model_config = ConfigDict(extra="allow")
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Strict):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool = False
    top_logprobs: Int64 | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def constraint(self, special_tokens: dict[str, int], tool_format: str = "json") -> StructuredOutputs | None:
        """response_format / structured_outputs, or the grammar of a forced tool call."""
        answer = super().constraint(special_tokens)
        if not self.forces_call:
            return answer
        if answer is not None:
            raise RequestError("tool_choice: a forced tool call cannot be combined with response_format "
                               "or structured_outputs")
        return constraints.tool_call_grammar(self.template_tools(), special_tokens, self.parallel_tool_calls is not False,
                                             tool_format)

    def stop_changes(self, special_tokens: dict[str, int]) -> dict:
        if self.parallel_tool_calls is not False or not self.tools or self.tool_choice == "none" or self.forces_call:
            return {}
        changes = constraints.one_call_stop(special_tokens)
        return {"stop_token_ids": [*(self.stop_token_ids or []), *changes.get("stop_token_ids", [])],
                "stop": [*_as_list(self.stop), *changes.get("stop", [])]}

    @property
    def forces_call(self) -> bool:
        return self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice)

    def template_messages(self) -> list[dict]:
        return [_template_message(m, i) for i, m in enumerate(self.messages)]

    def template_tools(self) -> list[dict] | None:
        if self.forces_call and not self.tools:
            raise RequestError("tool_choice: a tool call is required, but the request offers no tools")
        if not self.tools or self.tool_choice == "none":
            return None
        tools = [t.model_dump(exclude_none=True) for t in self.tools]
        if isinstance(self.tool_choice, NamedToolChoice):
            tools = [t for t in tools if t["function"]["name"] == self.tool_choice.function.name]
            if not tools:
                raise RequestError(f"tool_choice names {self.tool_choice.function.name!r}, which is not in tools")
        return tools

    def template_kwargs(self) -> dict[str, Any]:
        kwargs = dict(self.chat_template_kwargs or {})
        reserved = {"messages", "tools", "add_generation_prompt", "tokenize", "template"} & set(kwargs)
        if reserved:
            raise RequestError(f"chat_template_kwargs may not set {', '.join(sorted(reserved))}")
        return kwargs

    def num_logprobs(self) -> int | None:
        if not self.logprobs:
            if self.top_logprobs:
                raise RequestError("top_logprobs needs logprobs: true")
            return None
        return self.top_logprobs or 0


class CompletionRequest(SamplingFields):
    prompt: str | list[Int64] | list[str]
    max_tokens: PositiveInt | None = 16
    logprobs: Int64 | None = None
    echo: bool = False

    def prompt_input(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and p and all(isinstance(x, str) for x in p):
            if len(p) != 1:
                raise RequestError("one prompt per request (prompt lists of length 1 are accepted)")
            return p[0]
        if self.echo:
            raise RequestError("echo is not supported")
        return p


def _as_list(stop) -> list[str]:
    return [] if stop is None else [stop] if isinstance(stop, str) else list(stop)


def _template_message(m: ChatMessage, index: int) -> dict:
    """A message as chat templates read it: text parts joined, tool-call arguments as objects."""
    d = m.model_dump(exclude_none=True)
    if m.role == "developer":
        d["role"] = "system"
    if isinstance(m.content, list):
        if any(part.get("type") != "text" or not isinstance(part.get("text"), str) for part in m.content):
            raise RequestError(f"messages.{index}.content: only text parts are supported")
        d["content"] = "".join(part["text"] for part in m.content)
    for k, call in enumerate(d.get("tool_calls") or []):
        fn = call["function"]
        if isinstance(fn["arguments"], str):
            fn["arguments"] = _json_or_text(fn["arguments"], f"messages.{index}.tool_calls.{k}.function.arguments")
    return d


def _json_or_text(text: str, field: str):
    """The JSON value a string holds (the string itself if it holds none), never a deep one."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return text  # kept as the string the client sent
    path = too_deep(value, (field,))
    if path is not None:
        raise RequestError(f"{path} is nested deeper than {MAX_DEPTH} levels")
    return value


def too_deep(value, prefix: tuple = ()) -> str | None:
    """The path of the first value nested deeper than MAX_DEPTH containers, or None.
    Iterative, so that deep input cannot exhaust the stack of the check itself."""
    stack = [(value, prefix)]
    while stack:
        value, path = stack.pop()
        if len(path) - len(prefix) > MAX_DEPTH:
            return ".".join(map(str, path[:len(prefix) + 6])) + "..."
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        stack.extend((v, (*path, k)) for k, v in items if isinstance(v, (dict, list)))
    return None
