"""Chat templates: the checkpoint's Jinja2 template, rendered as transformers renders it.

Templates come with checkpoints, i.e. from strangers, so they run in Jinja's immutable
sandbox. `encode_chat` tokenises a conversation so that strings from the caller (message
content, tool arguments, tool schemas) can never turn into the template's control tokens:
those strings get their control tokens wrapped in private-use markers before rendering, and
a wrapped token is encoded as plain text (the scheme of transformers' `sanitize_control_tokens`).
"""

import json
import re
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import TokenizerError

# For checkpoints that ship no template (base models, bare vocabularies).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Publishers' templates for checkpoints of a known line that ship none (templates/README.md
# names each file's source). Keys: config.json `model_type` and GGUF `general.architecture`.
_TEMPLATE_DIR = Path(__file__).parent / "templates"
BUILTIN_TEMPLATES = {
    "qwen3_5": "qwen3_5.jinja", "qwen3_5_text": "qwen3_5.jinja",
    "qwen3_5_moe": "qwen3_5.jinja", "qwen3_5_moe_text": "qwen3_5.jinja",
    "qwen35": "qwen3_5.jinja", "qwen35moe": "qwen3_5.jinja",
}

# Noncharacters-adjacent private-use code points (plane 15) that no real text needs.
MARK_START, MARK_END = "\U000f0000", "\U000f0001"
# Older names for a message's reasoning; templates read `reasoning_content`.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson HTML-escapes `<>&'`, which would change the prompt.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def compile_template(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise TokenizerError(f"chat template does not compile: {e}") from e


def builtin_template(model_type: str | None) -> str | None:
    """The publisher's template for a model line (None for lines without one: ChatML then)."""
    name = BUILTIN_TEMPLATES.get(model_type or "")
    return (_TEMPLATE_DIR / name).read_text(encoding="utf-8") if name else None


def prepare_messages(messages: list[dict]) -> list[dict]:
    """Copies without None-valued keys (APIs send `content=None`), with reasoning under every name."""
    out = []
    for m in messages:
        if not isinstance(m, dict):
            raise TokenizerError(f"chat messages must be dicts, got {type(m).__name__}")
        m = {k: v for k, v in m.items() if v is not None}
        reasoning = next((m[k] for k in _REASONING_FIELDS if k in m), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def render(template: str, messages: list[dict], tools: list[dict] | None = None,
           add_generation_prompt: bool = True, **kwargs) -> str:
    """The prompt text, byte-identical to transformers' `apply_chat_template(tokenize=False)`."""
    compiled = compile_template(template)
    try:
        return compiled.render(messages=prepare_messages(messages), tools=tools,
                               add_generation_prompt=add_generation_prompt, **kwargs)
    except (jinja2.TemplateError, TypeError, ValueError) as e:  # also data the template cannot take (tojson)
        raise TokenizerError(f"chat template failed: {e}") from e


@lru_cache(maxsize=16)
def template_literals(template: str) -> str:
    """Every literal string in the template, NUL-joined so a search cannot span two of them."""
    ast = compile_template(template).environment.parse(template)
    literals = {n.data for n in ast.find_all(jinja2.nodes.TemplateData)}
    literals |= {n.value for n in ast.find_all(jinja2.nodes.Const) if isinstance(n.value, str)}
    return "\0".join(literals)


def control_tokens(template: str, added: dict[str, int], special_ids: frozenset[int]) -> list[str]:
    """Tokens that caller strings may not produce: every special token, and the added tokens
    the template itself writes (`<tool_call>`, `<think>`), except whitespace ones."""
    literals = template_literals(template)
    return [t for t, i in added.items()
            if i in special_ids or (t in literals and not t.isspace())]


def _alternation(tokens) -> str:
    # Longest first, so a token wins over the tokens it contains.
    return "|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)) or "(?!)"


def mark(obj, pattern: re.Pattern):
    """Wrap control tokens in every string of `obj` (recursively) in the private markers."""
    if isinstance(obj, str):
        # Markers already in the input are dropped, so they cannot forge a marked token.
        obj = obj.replace(MARK_START, "").replace(MARK_END, "")
        return pattern.sub(f"{MARK_START}\\g<0>{MARK_END}", obj)
    if isinstance(obj, dict):
        return {k: mark(v, pattern) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [mark(v, pattern) for v in obj]
    return obj


def encode_chat(tokenizer, template: str, messages: list[dict], tools: list[dict] | None = None,
                add_generation_prompt: bool = True, **kwargs) -> list[int]:
    """Prompt ids in which only the template's own control tokens are control ids.

    Marking every control token is transformers' scheme, but a template that edits content
    (Qwen3 splits assistant turns on `</think>` and strips newlines) edits around the markers
    and renders different text. Then only the special tokens (`<|im_start|>`, ...), which no
    template edits on, are marked, and `<think>` in content stays the token it is in the text.
    If that still changes the text, transformers' ids are the safe answer.
    """
    args = dict(template=template, tools=tools, add_generation_prompt=add_generation_prompt, **kwargs)
    text = render(messages=messages, **args)
    tokens = control_tokens(template, tokenizer.special_tokens, tokenizer.control_token_ids)
    specials = [t for t in tokens if tokenizer.special_tokens[t] in tokenizer.control_token_ids]
    first = None
    for marked_tokens in (tokens, specials):
        marked = _render_marked(marked_tokens, messages, args)
        first = first or marked
        if _MARKERS.sub("", marked) == text:
            return _encode_marked(tokenizer, marked)
    return _encode_marked(tokenizer, first)


_MARKERS = re.compile(f"[{MARK_START}{MARK_END}]")


def _render_marked(tokens: list[str], messages: list[dict], args: dict) -> str:
    pattern = re.compile(_alternation(tokens))
    args = {k: v if k in ("template", "add_generation_prompt") else mark(v, pattern) for k, v in args.items()}
    return render(messages=mark(messages, pattern), **args)


def _encode_marked(tokenizer, text: str) -> list[int]:
    # Splitting on markers gives [text, marked token, text, ...]; a lone marker (the template
    # cut a marked token apart) gives None and still breaks the text on either side.
    markers = re.compile(f"{MARK_START}({_alternation(tokenizer.special_tokens)}){MARK_END}"
                         f"|[{MARK_START}{MARK_END}]")
    pieces = markers.split(text)
    ids = tokenizer.encode(pieces[0])
    for i, piece in enumerate(pieces[1:], start=1):
        if piece:
            ids += _encode_piece(tokenizer, piece, as_text=i % 2 == 1)
    return ids


def _encode_piece(tokenizer, piece: str, as_text: bool) -> list[int]:
    ids = tokenizer.encode(piece, allow_special=not as_text)
    if as_text and tokenizer.special_tokens.get(piece) in ids:
        raise TokenizerError(f"cannot encode {piece!r} as text: plain BPE produces its token id")
    return ids
