"""The grammar of a forced tool call in the XML form (Qwen3-Coder, Qwen3.5), for llguidance.

    <tool_call>
    <function=NAME>
    <parameter=ARG>
    VALUE
    </parameter>
    </function>
    </tool_call>

A Lark grammar that only admits calls `tokenizer.tool_xml` parses into arguments that fit the
tool's schema: the function is one of the offered tools; its parameters come in the schema's
order, each required one present, no undeclared one; a value is held to its type where its text
has a form: numbers, booleans, objects and arrays as JSON under the parameter's own schema (the
template writes objects with `tojson`; booleans also in Python's spelling, as the template's
`| string` writes them), string enums as their values; any other string is free text that holds
none of the tags that would end it early (`</parameter>`, `<parameter=`, `</function>`,
`</tool_call>`). The chat template's framing (`tool_output.tool_format`: "xml" puts a newline on
each side of a value, "xml_literal" none) is followed, so the parser strips what the template adds.
"""

from __future__ import annotations

import json

from ..tokenizer.tool_args import is_text, schema_types

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
# Text that ends a value early in the parser (tool_xml.VALUE_ENDS), so never inside a string value.
VALUE_ENDS = ("</parameter>", "<parameter=", "</function>", "</tool_call>")
PYTHON_BOOLS = ("true", "false", "True", "False")


def xml_call_lark(tools: list[dict], special_tokens: dict[str, int], parallel: bool, framed: bool = True) -> str:
    """The Lark grammar for one call (several, "\\n"-separated, when parallel) to one of `tools`."""
    nl = "\\n" if framed else ""
    open_, close = (t if t in special_tokens else json.dumps(t) for t in (CALL_OPEN, CALL_CLOSE))
    start = 'start: call ("\\n" call)*' if parallel else "start: call"
    lexemes: dict[str, str] = {}  # free-text lexemes by name (one per length bound)
    functions = [_function_rules(f"f{i}", t["function"], nl, lexemes) for i, t in enumerate(tools)]
    lines = [start, f'call: {open_} "\\n" function "\\n" {close}',
             "function: " + " | ".join(f"f{i}" for i in range(len(tools))),
             *(line for rules in functions for line in rules), *(f"{k}: {v}" for k, v in lexemes.items())]
    return "\n".join(lines) + "\n"


def _function_rules(rule: str, function: dict, nl: str, lexemes: dict[str, str]) -> list[str]:
    """`rule: "<function=NAME>\\n" params... "</function>"` and one rule per parameter."""
    schema = function.get("parameters") or {}
    props = schema.get("properties") or {}
    required = [r for r in schema.get("required") or [] if isinstance(r, str)]
    names = [*props, *(r for r in required if r not in props)]  # a required name with no schema: free text
    lines, body = [], []
    for k, name in enumerate(names):
        param = f"{rule}_p{k}"
        body.append(param if name in required else f"{param}?")
        value = _value(props.get(name), nl, function.get("strict") is True, lexemes)
        lines.append(f"{param}: {_lit(f'<parameter={name}>')} {_quote(nl)} {value} \"\\n\"")
    header = _lit(f"<function={function['name']}>\n")
    return [f"{rule}: {header} {' '.join(body)} {_lit('</function>')}", *lines]


def _value(schema, nl: str, strict: bool, lexemes: dict[str, str]) -> str:
    """The grammar of one value and its closing tag, from the parameter's schema."""
    end = _quote(f"{nl}</parameter>")
    types = schema_types(schema)
    choices = (schema or {}).get("enum", [(schema or {})["const"]] if "const" in (schema or {}) else None)
    if is_text(types) and isinstance(choices, list) and choices and all(isinstance(c, str) for c in choices):
        return "(" + " | ".join(_lit(c) for c in choices) + f") {end}"
    if not types or "string" in types:  # any text is a string here; the parser keeps it verbatim
        return _text(schema if is_text(types) else None, nl, lexemes)
    if types == {"boolean"} and choices is None:
        return "(" + " | ".join(_lit(b) for b in PYTHON_BOOLS) + f") {end}"
    one_line = {**schema, "x-guidance": {"whitespace_pattern": "[\\x20]?", "lenient": not strict}}
    return f"%json {json.dumps(one_line)} {end}"


def _text(schema, nl: str, lexemes: dict[str, str]) -> str:
    """The name of a lexeme: free text (within a string schema's minLength / maxLength, in
    characters), then the closing tag, holding no tag that would end it sooner. One lexeme with its
    closing tag: a free-text lexeme alone would swallow the tag's first characters."""
    low, high = (_bound((schema or {}).get(k)) for k in ("minLength", "maxLength"))
    name = f"TEXT_{low or 0}_{'' if high is None else high}".rstrip("_")
    ends = "|".join(_regex_escape(e) for e in VALUE_ENDS)
    close = _regex_escape(f"{nl}</parameter>".replace("\\n", "\n"))
    length = "*" if low is None and high is None else f"{{{low or 0},{'' if high is None else high}}}"
    lexemes[name] = f"/(?s:.{length}){close}/ & ~/(?s:.*({ends}).*{_regex_escape('</parameter>')})/"
    return name


def _bound(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _regex_escape(text: str) -> str:
    return "".join("\\" + c if c in "\\/.^$|?*+()[]{}" else ("\\n" if c == "\n" else c) for c in text)


def _lit(text: str) -> str:
    return json.dumps(text)


def _quote(text: str) -> str:
    """A literal for text already written with Lark escapes ("\\n"), or nothing for ""."""
    return f'"{text}"' if text else ""
