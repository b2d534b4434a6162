"""Text from a model (node names, metadata, paths) made safe for each output format.

A model is data: a node name may hold a terminal escape sequence, a bidi override
(U+202E makes ``exe.txt`` read ``txt.exe``), a Markdown image that a pull-request
comment would fetch, or HTML. Every report writer escapes through exactly one function
per format, here, so a format cannot be escaped one way in one place and another way
elsewhere:

- :func:`text` for terminals and plain text: control and format characters (Unicode
  categories Cc, Cf, Zl, Zp: escapes, bidi controls, zero-width characters, line
  separators) become visible ``\\u202e``-style escapes.
- :func:`markdown` for a Markdown table cell or list item: :func:`text`, one line, then
  every character CommonMark gives a meaning to backslash-escaped, and ``<``/``>``/``&`` as
  entities, so it renders as the literal text.
- :func:`html` for HTML/SVG text and attribute values: :func:`text`, then ``html.escape``.
"""
from __future__ import annotations

import html as _html
import re
import unicodedata

__all__ = ["html", "markdown", "text"]

#: Unicode categories that are not shown as a glyph but change how text is read.
_INVISIBLE = {"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"}
#: Punctuation that starts Markdown inline syntax (code, emphasis, links and images — no
#: ``](`` without an unescaped ``]`` —, tables, strike-through, headings, GitHub's $math$);
#: CommonMark renders ``\\X`` as a literal X.
_MD_SPECIAL = re.compile(r"([\\`*_\[\]!|~#$])")
#: A line that starts like a list item or quote would nest one.
_MD_LEADING = re.compile(r"^(\s*[-+]|\s*\d+(?=[.)]))")


def _visible(ch: str) -> str:
    if unicodedata.category(ch) not in _INVISIBLE:
        return ch
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else (f"\\u{code:04x}" if code < 0x10000
                                                  else f"\\U{code:08x}")


def text(value) -> str:
    """``value`` as plain text with every invisible or control character shown escaped."""
    s = str(value)
    if s.isprintable():  # the common case: nothing to do
        return s
    return "".join(_visible(ch) for ch in s.replace("\t", " "))


def markdown(value) -> str:
    """``value`` as literal text inside a Markdown table cell or list item (one line)."""
    s = text(str(value).replace("\r\n", " ").replace("\n", " ").replace("\r", " "))
    s = _MD_SPECIAL.sub(r"\\\1", s)
    s = _MD_LEADING.sub(lambda m: m.group(1) + "\\" if m.group(1)[-1].isdigit()
                        else m.group(1)[:-1] + "\\" + m.group(1)[-1], s)
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def html(value) -> str:
    """``value`` as HTML/SVG text or a quoted attribute value."""
    return _html.escape(text(value), quote=True)
