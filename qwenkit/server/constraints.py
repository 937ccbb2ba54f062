"""What a request constrains its answer to, as the engine's `StructuredOutputs`.

Three sources, in OpenAI's and vLLM's spellings: `response_format` (`json_schema` with `strict`,
`json_object`), `structured_outputs` (`json`, `regex`, `choice`, `grammar`, `json_object`) and,
for chat, `tool_choice: "required"` or a named function. A forced tool call is a grammar in the
format the model's chat template asks for: Qwen2.5/Qwen3's `<tool_call>\\n{"name": ..., "arguments":
{...}}\\n</tool_call>`, the arguments held to the tool's JSON schema, or Qwen3-Coder/Qwen3.5's XML
form (xml_call_grammar.py); with `parallel_tool_calls: false`, exactly one call.
"""

from __future__ import annotations

import json

from ..engine.sampling_params import StructuredOutputs
from ..errors import RequestError
from .xml_call_grammar import xml_call_lark

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"


def from_response_format(fmt) -> StructuredOutputs | None:
    """`response_format` ({"type": "text" | "json_object" | "json_schema", ...}) as a constraint."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return StructuredOutputs(json_object=True, origin="response_format")
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise RequestError("response_format.json_schema.schema: a json_schema response format needs a schema")
    return StructuredOutputs(json=fmt.json_schema.schema_, strict=bool(fmt.json_schema.strict),
                             origin="response_format.json_schema.schema")


def from_structured_outputs(so) -> StructuredOutputs | None:
    """vLLM's `structured_outputs` field as a constraint (exactly one kind)."""
    if so is None:
        return None
    given = {k: v for k, v in (("json", so.json_), ("regex", so.regex), ("choice", so.choice),
                               ("grammar", so.grammar)) if v is not None}
    if so.json_object:
        given["json_object"] = True
    if len(given) != 1:
        raise RequestError(f"structured_outputs: give exactly one of json, regex, choice, grammar, json_object "
                           f"(got {', '.join(given) or 'none'})")
    (kind, value), = given.items()
    return StructuredOutputs(**{kind: value}, origin=f"structured_outputs.{kind}")


def tool_call_grammar(tools: list[dict], special_tokens: dict[str, int], parallel: bool,
                      tool_format: str = "json") -> StructuredOutputs:
    """A Lark grammar for one call (or several, when parallel) to one of `tools` (OpenAI tool dicts),
    in `tool_format` (a key of tokenizer.output.TOOL_FORMATS)."""
    if tool_format != "json":
        lark = xml_call_lark(tools, special_tokens, parallel, framed=tool_format == "xml")
        return StructuredOutputs(grammar=lark, origin="tools")
    schemas = [_call_schema(t["function"]) for t in tools]
    one = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    # Qwen writes a call on one line, json.dumps style: at most a space between JSON tokens.
    # Keywords the library cannot enforce are ignored unless a function asks to be strict.
    strict = any(t["function"].get("strict") is True for t in tools)
    one["x-guidance"] = {"whitespace_pattern": "[\\x20]?", "lenient": not strict}
    # The markers are single tokens in Qwen's vocabulary: the grammar names those tokens, so the
    # model writes them as it was trained to (the same text spelled in pieces would not be).
    open_, close = (t if t in special_tokens else json.dumps(t) for t in (CALL_OPEN, CALL_CLOSE))
    start = 'start: call ("\\n" call)*' if parallel else "start: call"
    lark = f'{start}\ncall: {open_} "\\n" %json {json.dumps(one)} "\\n" {close}\n'
    return StructuredOutputs(grammar=lark, origin="tools")


def _call_schema(function: dict) -> dict:
    params = function.get("parameters") or {"type": "object", "properties": {}}
    return {"type": "object", "properties": {"name": {"const": function["name"]}, "arguments": params},
            "required": ["name", "arguments"], "additionalProperties": False}


def one_call_stop(special_tokens: dict[str, int]) -> dict:
    """Settings that end generation after the first tool call (`parallel_tool_calls: false` under
    `tool_choice: "auto"`): the closing tag as a stop token (kept in the text), else a stop string."""
    if CALL_CLOSE in special_tokens:
        return {"stop_token_ids": [special_tokens[CALL_CLOSE]]}
    return {"stop": [CALL_CLOSE]}
