"""Report rendering: JSON schema kept, Markdown/text safe, HTML well-formed, offline, escaped,
and charts drawn to scale. Reports are built by hand here (records are plain data)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import onnx
import pytest
from conftest import tiny_cnn

from onnxlr import charts
from onnxlr.html_report import render_html
from onnxlr.records import DECLINED, FACTORISED, REVERTED, LayerRecord
from onnxlr.report import Report, md_cell
from onnxlr.runtime import Comparison, OutputComparison

SVG = "{http://www.w3.org/2000/svg}"
XHTML = "{http://www.w3.org/1999/xhtml}"
HOSTILE = "<script>alert(1)</script>"
FORMAT = "{0}%s{__class__}"


def _cand(ranks, macs, werr, lerr, ms, chosen=False):
    return {"ranks": list(ranks), "macs": macs, "weight_error": werr, "local_error": lerr,
            "latency_ms": ms, "chosen": chosen}


def full_report() -> Report:
    recs = [
        LayerRecord(HOSTILE, "Conv", "conv", (64, 32, 3, 3), "tucker", "0.5", (32, 16),
                    18432, 7000, 4_720_000, 1_840_000, 0.66, 0.1, FACTORISED,
                    latency_before_ms=2.0, latency_after_ms=0.8,
                    candidates=[_cand((16, 8), 500_000, 0.8, 0.4, 0.5),
                                _cand((32, 16), 1_840_000, 0.66, 0.1, 0.8, True),
                                _cand((48, 24), 3_000_000, 0.5, 0.05, 1.4)]),
        LayerRecord(FORMAT, "Gemm", "gemm", (10, 256), "svd", "8", (8,), 2570, 2130, 2560, 2120,
                    0.3, 0.02, REVERTED, reason="not faster: {0} %d | pipe",
                    latency_before_ms=0.01, latency_after_ms=0.02,
                    candidates=[_cand((4,), 1060, 0.5, 0.3, 0.02),
                                _cand((8,), 2120, 0.3, 0.02, 0.02, True)]),
        LayerRecord("a|b", "Conv", "conv1x1", (8, 8, 1, 1), reason="no method\x1b[31m selected",
                    status=DECLINED, params_before=64, macs_before=640),
        LayerRecord("act_matmul", "MatMul", None, reason="activations on both sides"),
    ]
    rep = Report(source="models/<b>net</b>.onnx", method="auto", rank="0.5", rank_multiple=1,
                 max_error=0.05, records=recs, accept="latency", seconds=1.5)
    rep.comparison = Comparison([OutputComparison(HOSTILE, 0.01, 0.2, 0.999, 1.0)], 0.05)
    rep.verify_inputs = "seeded random inputs"
    rep.accuracy = (0.98, 0.975)
    rep.latency = {"provider": "cpu", "threads": 1, "batch": 1, "before_ms": 3.0,
                   "after_ms": 2.0, "speedup": 1.5, "p10": 1.4, "p90": 1.6}
    rep.profile = {HOSTILE: {"before_ms": 2.0, "after_ms": 0.5},
                   FORMAT: {"before_ms": 0.25, "after_ms": 0.25},
                   "a|b": {"before_ms": 0.1, "after_ms": 0.1},
                   "(other)": {"before_ms": 1.0, "after_ms": 1.0}}
    rep.budget = {"target_speedup": 2.0, "achieved_speedup": 1.5, "target_met": False,
                  "bound": "max-error <i>"}
    return rep


def empty_report() -> Report:
    return Report(source=None, method="auto", rank="vbmf", rank_multiple=1, max_error=None)


def parse_xhtml(page: str) -> ET.Element:
    assert page.startswith("<!DOCTYPE html>\n")
    return ET.fromstring(page.split("\n", 1)[1])  # raises on any unbalanced or unquoted markup


# --- JSON -----------------------------------------------------------------------------------

OLD_SUMMARY = {"layers_factorised", "layers_considered", "params_before", "params_after",
               "macs_before", "macs_after", "params_ratio", "macs_ratio", "output_error",
               "bound_met", "accuracy_before", "accuracy_after", "seconds"}
OLD_LAYER = {"name", "op", "kind", "weight_shape", "method", "rank_rule", "ranks", "params_before",
             "params_after", "macs_before", "macs_after", "weight_error", "output_error", "status",
             "reason", "seconds", "extra"}


@pytest.mark.parametrize("make", [full_report, empty_report])
def test_json_round_trips_and_keeps_every_old_key(make):
    rep = make()
    data = json.loads(rep.to_json())
    assert data["schema"] == "onnxlr.report/1"
    assert {"schema", "source", "settings", "summary", "verification", "layers"} <= set(data)
    assert {"method", "rank", "rank_multiple", "max_error"} <= set(data["settings"])
    assert OLD_SUMMARY <= set(data["summary"])
    for layer in data["layers"]:
        assert OLD_LAYER <= set(layer)
    assert {"latency", "profile", "budget"} <= set(data)
    assert {"macs_reduction", "speedup", "efficiency"} <= set(data["summary"])


def test_json_new_fields_have_the_measured_values():
    data = json.loads(full_report().to_json())
    s = data["summary"]
    # the reverted and the declined layer keep their MACs
    macs_before, macs_after = 4_720_000 + 2560 + 640, 1_840_000 + 2560 + 640
    assert s["macs_before"] == macs_before and s["macs_after"] == macs_after
    assert s["macs_reduction"] == pytest.approx(macs_before / macs_after)
    assert s["speedup"] == 1.5
    assert s["efficiency"] == pytest.approx(1.5 / (macs_before / macs_after))
    assert s["latency_before_ms"] == 3.0 and s["latency_after_ms"] == 2.0
    assert data["settings"]["accept"] == "latency"
    assert data["profile"]["(other)"] == {"before_ms": 1.0, "after_ms": 1.0}
    assert data["budget"]["target_speedup"] == 2.0
    first = data["layers"][0]
    assert first["name"] == HOSTILE and first["layer_speedup"] == pytest.approx(2.5)
    assert first["latency_before_ms"] == 2.0 and len(first["candidates"]) == 3
    empty = json.loads(empty_report().to_json())["summary"]
    assert empty["speedup"] is None and empty["efficiency"] is None


# --- text and Markdown ----------------------------------------------------------------------

def test_markdown_escapes_pipes_and_html():
    md = full_report().to_markdown()
    assert md.startswith("### onnxlr report")
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    n_cols = rows[0].count("|") - 1
    for row in rows:
        unescaped = len(re.findall(r"(?<!\\)\|", row))
        assert unescaped == n_cols + 1, row
    assert "a\\|b" in md and "\\| pipe" in md
    assert "<script>" not in md and "&lt;script&gt;" in md
    assert "\x1b" not in md
    assert md_cell("x|y\nz") == "x\\|y z"


def test_text_shows_latency_columns_efficiency_and_no_control_characters():
    text = full_report().to_text()
    assert "alone ms" in text and "in-model ms" in text
    assert "2→0.8 (2.50x)" in text          # layer timed alone
    assert "2→0.5 (4.00x)" in text          # inside the model (profile)
    assert "efficiency" in text and "1.50x faster" in text
    assert "budget: target_speedup 2" in text
    assert "\x1b" not in text and "no method\\x1b[31m selected" in text
    assert "act_matmul" not in text          # not a candidate: JSON only
    plain = empty_report().to_text()
    assert "alone ms" not in plain and "in-model ms" not in plain and "efficiency" not in plain


# --- HTML -----------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [full_report, empty_report])
def test_html_is_well_formed_and_self_contained(make):
    page = render_html(make())
    root = parse_xhtml(page)
    tags = {el.tag.split("}")[-1] for el in root.iter()}
    assert not tags & {"script", "link", "img", "iframe", "object", "embed", "image", "use"}
    for el in root.iter():
        assert not {"src", "href", "{http://www.w3.org/1999/xlink}href"} & set(el.attrib)
        assert not any(k.startswith("on") for k in el.attrib)  # no event handlers
    # the only URLs are the XML namespace names
    assert set(re.findall(r"https?://[^\s\"'<>]+", page)) <= {
        "http://www.w3.org/2000/svg", "http://www.w3.org/1999/xhtml"}
    assert "@import" not in page and "url(" not in page


def test_html_escapes_hostile_names_and_reasons():
    page = render_html(full_report())
    assert HOSTILE not in page and "<b>net</b>" not in page and "<i>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert FORMAT in page                      # shown literally, never used as a format
    assert "not faster: {0} %d | pipe" in page
    root = parse_xhtml(page)
    texts = "".join(root.itertext())
    assert HOSTILE in texts                    # the reader sees the name as text
    assert "\x1b" not in page


def _bars(svg: ET.Element, cls: str) -> list[ET.Element]:
    return [r for r in svg.iter(f"{SVG}rect") if r.get("class") == f"bar {cls}"]


def test_html_latency_bars_are_to_scale():
    rep = full_report()
    root = parse_xhtml(render_html(rep))
    chart = next(s for s in root.iter(f"{SVG}svg")
                 if s.get("aria-label") == "latency per layer before and after")
    before, after = _bars(chart, "before"), _bars(chart, "after")
    # one bar pair per candidate layer plus "(other)", in profile order
    expected_b = [2.0, 0.25, 0.1, 1.0]
    expected_a = [0.5, 0.25, 0.1, 1.0]
    assert [float(r.get("data-value")) for r in before] == expected_b
    assert [float(r.get("data-value")) for r in after] == expected_a
    widths = [float(r.get("width")) for r in before + after]
    values = expected_b + expected_a
    scale = widths[0] / values[0]
    for w, v in zip(widths, values):
        assert w == pytest.approx(v * scale, abs=0.01)
    assert max(widths) > 100                  # the largest bar fills a good part of the chart


def test_html_shows_candidates_summary_and_budget():
    rep = full_report()
    page = render_html(rep)
    root = parse_xhtml(page)
    svgs = list(root.iter(f"{SVG}svg"))
    labels = [s.get("aria-label") for s in svgs]
    rank_charts = [s for s in svgs if s.get("aria-label", "").startswith("error against rank")]
    assert len(rank_charts) == 2              # one per layer with candidates
    # local error line of the first layer goes through its 3 candidates, lowest rank first
    line = next(rank_charts[0].iter(f"{SVG}polyline"))
    assert len(line.get("points").split()) == 3
    scatter = next(s for s in svgs
                   if s.get("aria-label") == "speed-up against error of the candidates")
    dots = [c for c in scatter.iter(f"{SVG}circle") if c.get("class") in ("point", "chosen")]
    # outlined: the kept layer's chosen candidate only, not the reverted layer's
    assert len(dots) == 5 and sum(c.get("class") == "chosen" for c in dots) == 1
    assert "ideal and measured speed-up" in labels and "time per layer" in labels
    text = "".join(root.itertext())
    assert "1.50×" in text and "efficiency" in text and "target speed-up" in text
    assert "not met" in text and "0.9750" in text          # budget missed, accuracy after


def test_paired_bars_and_ticks():
    svg = ET.fromstring(charts.paired_bars([("x", 4.0, 1.0), ("y", None, 2.0)]))
    bars = [r for r in svg.iter(f"{SVG}rect") if (r.get("class") or "").startswith("bar")]
    assert [float(r.get("data-value")) for r in bars] == [4.0, 1.0, 2.0]
    w = [float(r.get("width")) for r in bars]
    assert w[0] == pytest.approx(4 * w[1]) and w[2] == pytest.approx(2 * w[1])
    for hi in (0.013, 1.0, 7.3, 480.0):
        ticks = charts.nice_ticks(hi)
        assert ticks[0] == 0 and ticks[-1] >= hi and len(ticks) <= 8
    assert charts.shorten("/features/features.1/features.1.0/Conv", 24).endswith("/Conv")


def test_cli_writes_html_report(tmp_path):
    model = tmp_path / "tiny.onnx"
    onnx.save(tiny_cnn(), model)
    html, bad = tmp_path / "r.html", tmp_path / "r.txt"
    done = subprocess.run([sys.executable, "-m", "onnxlr", "optimize", str(model), "-o",
                           str(tmp_path / "o.onnx"), "--rank", "0.5", "--no-verify",
                           "--max-error", "none", "--report", str(html)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    root = parse_xhtml(html.read_text(encoding="utf-8"))
    assert "conv2" in "".join(root.itertext())
    done = subprocess.run([sys.executable, "-m", "onnxlr", "optimize", str(model), "-o",
                           str(tmp_path / "o2.onnx"), "--report", str(bad)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and ".html" in done.stderr and len(done.stderr.splitlines()) == 1
    assert not bad.exists() and not (tmp_path / "o2.onnx").exists()


def test_html_flags_what_went_wrong_first():
    rep = full_report()
    assert "Look at this first" not in render_html(rep)    # nothing wrong: no callout
    rep.accuracy = (1.0, 0.5)
    rep.profile[HOSTILE] = {"before_ms": 1.0, "after_ms": 2.0}
    rep.latency["speedup"] = 0.8
    rep.comparison = Comparison([OutputComparison("logits", 0.9, 3.0, 0.4, 0.2)], 0.05)
    root = parse_xhtml(render_html(rep))
    callout = next(d for d in root.iter(f"{XHTML}div") if d.get("class") == "callout")
    notes = ["".join(li.itertext()) for li in callout.iter(f"{XHTML}li")]
    assert any("exceeds the bound" in n for n in notes)
    assert any("100.0% to 50.0%" in n for n in notes)
    assert any("only 20.0%" in n for n in notes)
    assert any("slower end to end (0.80×)" in n for n in notes)
    assert any(HOSTILE + " (0.50×)" in n for n in notes)
