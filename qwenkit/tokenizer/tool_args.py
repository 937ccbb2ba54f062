"""Argument values of XML tool calls, typed by the tool's JSON schema.

An XML call (`<parameter=NAME>VALUE</parameter>`) writes every value as text, the way the chat
template renders it: strings as they are, numbers and booleans through Python's `str`
(`True`, `None`), objects and arrays as JSON. `param_types` reads the request's tools once;
`convert` turns one value's text back into the value its schema asks for.

A parameter whose schema allows only strings (or that has no schema, or whose tool is unknown)
is kept verbatim. Otherwise the text is tried as each allowed type; text that fits none is kept
as the string the model wrote, with a note saying which type was expected (never dropped:
the caller can still see what the model meant).
"""

from __future__ import annotations

import ast
import json
import math

_PYTHON_WORDS = {"True": True, "False": False, "None": None}
_TYPES = ("null", "boolean", "integer", "number", "object", "array")


def param_types(tools) -> dict[str, dict[str, frozenset[str]]]:
    """{tool name: {parameter name: allowed JSON types}} from OpenAI-style `tools`."""
    out = {}
    for tool in tools or ():
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            continue
        props = (fn.get("parameters") or {}).get("properties")
        if isinstance(props, dict):
            out[fn["name"]] = {name: schema_types(s) for name, s in props.items()}
    return out


def schema_types(schema) -> frozenset[str]:
    """The JSON types a schema allows: `type` (one or a list), else those of `anyOf`/`oneOf`
    branches, else those of its `enum` values; empty when it says nothing (any text is kept)."""
    if not isinstance(schema, dict):
        return frozenset()
    kind = schema.get("type")
    if isinstance(kind, str):
        return frozenset([kind])
    if isinstance(kind, list):
        return frozenset(k for k in kind if isinstance(k, str))
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list):
            return frozenset().union(*(schema_types(s) for s in schema[key]))
    if isinstance(schema.get("enum"), list):
        return frozenset(_type_of(v) for v in schema["enum"])
    return frozenset()


def is_text(types: frozenset[str]) -> bool:
    """Whether a value of these types is kept verbatim (and so can be streamed as it arrives)."""
    return not types & set(_TYPES)


def convert(text: str, types: frozenset[str]):
    """(value, None) for text that fits one of `types`, else (text itself, why it fits none)."""
    if is_text(types):
        return text, None
    literal = _literal(text.strip())
    for kind in _TYPES:
        if kind in types and literal is not _NOTHING and _fits(literal, kind):
            return (int(literal) if kind == "integer" else literal), None
    if "string" in types:
        return text, None
    expected = " or ".join(sorted(types))
    return text, f"expected {expected}, got {text.strip()[:40]!r}; kept as a string"


_NOTHING = object()


def _literal(text: str):
    """The value text spells as JSON, or as a Python literal (`True`, `{'a': 1}`), or _NOTHING."""
    if text in _PYTHON_WORDS:
        return _PYTHON_WORDS[text]
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        pass
    try:
        value = ast.literal_eval(text) if text[:1] in "[{" else _NOTHING
        json.dumps(value, allow_nan=False)  # sets, tuple keys, bytes: not JSON values
        return value
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        return _NOTHING


def _fits(value, kind: str) -> bool:
    if kind == "null":
        return value is None
    if kind == "boolean":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind == "integer":
        return isinstance(value, int) or isinstance(value, float) and value.is_integer()
    if kind == "number":
        return isinstance(value, int) or isinstance(value, float) and math.isfinite(value)
    return isinstance(value, dict if kind == "object" else list)


def _type_of(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {dict: "object", list: "array"}.get(type(value), "string")
