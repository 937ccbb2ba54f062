"""Request schemas of the OpenAI-compatible API, and their translation to SamplingParams.

Fields of the wrong type are rejected by pydantic (HTTP 400); values out of range by
SamplingParams (RequestError, HTTP 400). Unknown fields are ignored, as OpenAI's API does.
Extensions in vLLM's spelling: top_k, min_p, repetition_penalty, ignore_eos, stop_token_ids,
skip_special_tokens, chat_template_kwargs (e.g. {"enable_thinking": false} for Qwen3).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..engine.sampling_params import SamplingParams
from ..errors import RequestError


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        if self.n != 1:
            raise RequestError("n must be 1 (send several requests for several completions)")
        try:
            bias = {int(k): v for k, v in (self.logit_bias or {}).items()}
        except ValueError:
            raise RequestError("logit_bias keys must be token ids") from None
        return SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0, min_p=self.min_p or 0.0,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, logit_bias=bias, seed=self.seed, stop=self.stop,
            stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos, logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str


class Tool(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"] = "function"
    function: FunctionSpec


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionSpec


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def template_messages(self) -> list[dict]:
        return [_template_message(m) for m in self.messages]

    def template_tools(self) -> list[dict] | None:
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
    prompt: str | list[int] | list[str]
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = None
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


def _template_message(m: ChatMessage) -> dict:
    """A message as chat templates read it: text parts joined, tool-call arguments as objects."""
    d = m.model_dump(exclude_none=True)
    if m.role == "developer":
        d["role"] = "system"
    if isinstance(m.content, list):
        if any(part.get("type") != "text" or not isinstance(part.get("text"), str) for part in m.content):
            raise RequestError("only text content parts are supported")
        d["content"] = "".join(part["text"] for part in m.content)
    for call in d.get("tool_calls") or []:
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
            try:
                fn["arguments"] = json.loads(fn["arguments"])
            except ValueError:
                pass  # kept as the string the client sent
    return d
