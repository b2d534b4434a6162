"""Issue 13.6: model text is data in every report format (one escaper per format)."""
from __future__ import annotations

import re

import onnx
import pytest
from conftest import init, make_model, vinfo
from hostile import weight
from onnx import helper

from onnxlr import escape
from onnxlr.benchmark import benchmark
from onnxlr.inspect import format_views, inspect_model
from onnxlr.pipeline import optimize

MARKUP = "![x](http://evil.example/t.png) [y](javascript:alert(1)) **b** `c` ~~s~~ $m$ #h"
BIDI = "abc\u202edcba\u2066\u200b\u2028"


def markup_model(name: str = MARKUP + BIDI) -> onnx.ModelProto:
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], name=name)]
    return make_model(nodes, [vinfo("x", [1, 8, 9, 9])], [vinfo("y", None)], [init("W", weight())])


def _unescaped(md: str) -> str:
    """The Markdown with every backslash escape and entity removed: what could still be syntax."""
    return re.sub(r"&(amp|lt|gt);", "", re.sub(r"\\.", "", md))


def _assert_literal_markdown(md: str, literal: str = MARKUP) -> None:
    rest = _unescaped(md.replace("### onnxlr", "").replace("**", "", 2))
    for syntax in ("![", "](", "**", "`", "~~", "$", "#"):
        assert syntax not in rest, syntax
    markdown_it = pytest.importorskip("markdown_it")
    html = markdown_it.MarkdownIt("commonmark").enable(["table", "strikethrough"]).render(md)
    for tag in ("<img", "<a ", "<code>", "<em>", "<s>", "<h1>"):
        assert tag not in html, tag
    import html as html_module
    assert literal in html_module.unescape(html)  # shown as the text it is, ** and all


def test_markdown_escaper_makes_syntax_literal():
    md = escape.markdown(MARKUP)
    _assert_literal_markdown(md)
    # the text itself survives: a reader sees the name as it is
    assert re.sub(r"\\(.)", r"\1", md) == MARKUP


def test_text_escaper_shows_bidi_and_control_characters():
    out = escape.text(BIDI + "\x1b[2J\x00")
    assert out.isprintable() and "\\u202e" in out and "\\x1b" in out and "\\u2028" in out
    assert escape.text("plain näme 0.5") == "plain näme 0.5"


def _assert_printable_lines(text: str) -> None:
    for line in text.splitlines():
        assert line.isprintable(), repr(line)


def test_reports_render_node_names_as_literal_text():
    _, report = optimize(markup_model(), "tucker", "0.5", max_error=1.0)
    _assert_literal_markdown(report.to_markdown())
    _assert_printable_lines(report.to_text())
    assert "\u202e" not in report.to_html()
    table = format_views(inspect_model(markup_model(), rules=("0.5",)), ("0.5",))
    _assert_printable_lines(table)


def test_bench_reports_escape_model_paths(tmp_path):
    path = tmp_path / ("m" + "[y](javascript:x)**b**`c`\u202e.onnx")
    onnx.save(markup_model("conv"), path)
    result = benchmark([str(path)], warmup=0, iterations=2)
    _assert_literal_markdown(result.to_markdown(), "[y](javascript:x)**b**`c`")
    _assert_printable_lines(result.to_text())
