"""Markdown to HTML for the chat page, on the server: markdown-it-py (CommonMark + tables) with
code blocks highlighted by Pygments, both from the `server` extra.

Raw HTML in a reply is escaped, not passed through (html=False), and markdown-it refuses
`javascript:`-style links, so a model's text cannot script the page.
"""

from __future__ import annotations

from functools import cache

from ...errors import ConfigError

CODE = ".md pre code"  # where highlighted code sits in the page (app.css styles the box)
LIGHT, DARK = "default", "monokai"


def _needed():
    try:
        import markdown_it
        import pygments
    except ImportError as e:
        raise ConfigError(f"the chat page needs {e.name} (pip install 'qwenkit[server]'), or pass --no-ui") from None
    return markdown_it, pygments


def _highlight(code: str, lang: str, _attrs) -> str:
    """Pygments spans for a fenced block in a language it knows; "" lets markdown-it escape it plain."""
    from pygments import highlight
    from pygments.formatters import HtmlFormatter
    from pygments.lexers import get_lexer_by_name
    from pygments.util import ClassNotFound

    if not lang:
        return ""
    try:
        lexer = get_lexer_by_name(lang.split()[0])
    except ClassNotFound:
        return ""
    return highlight(code, lexer, HtmlFormatter(nowrap=True))


@cache
def _parser():
    markdown_it, _ = _needed()
    return markdown_it.MarkdownIt("commonmark", {"html": False, "highlight": _highlight}).enable("table")


def render(text: str) -> str:
    """HTML for one message's markdown."""
    return _parser().render(text)


def highlight_css() -> str:
    """Pygments' token colours for code in the page, light and (when the browser asks) dark."""
    _needed()
    from pygments.formatters import HtmlFormatter

    light = HtmlFormatter(style=LIGHT).get_style_defs(CODE)
    dark = HtmlFormatter(style=DARK).get_style_defs(CODE)
    return f"{light}\n@media (prefers-color-scheme: dark) {{\n{dark}\n}}\n"
