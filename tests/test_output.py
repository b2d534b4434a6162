"""What a person reads: the terminal (progress, tables that fit its width), one direction for
every ratio in text, Markdown and HTML, a speed-up verdict only where the timing's noise
allows one, and the HTML charts' conventions (integer rank ticks, rings on kept layers only,
notes off the lines, the status readable at 760 px)."""
from __future__ import annotations

import ast
import io
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import onnx
import pytest
from conftest import tiny_cnn
from test_report import FORMAT, HOSTILE, SVG, XHTML, full_report, parse_xhtml

from onnxlr import charts, console, formats
from onnxlr.html_report import render_html
from onnxlr.records import FACTORISED, LayerRecord

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
LONG = "/encoder/layers.11/attention/self/query_key_value_projection_with_a_long_name/MatMul"


def _wide_report():
    rep = full_report()
    rep.records.append(LayerRecord(LONG, "MatMul", "matmul", (768, 2304), "svd", "0.5", (384,),
                                   1_769_472, 1_179_648, 1_769_472, 1_179_648, 0.2, 0.05,
                                   FACTORISED, latency_before_ms=1.0, latency_after_ms=0.7))
    return rep


# --- the terminal ---------------------------------------------------------------------------

@pytest.mark.parametrize("width", [80, 60])
def test_text_fits_the_width_and_loses_nothing(width):
    rep = _wide_report()
    wide, narrow = rep.to_text(), rep.to_text(width)
    assert max(map(len, wide.splitlines())) > width          # the table would not fit
    assert max(map(len, narrow.splitlines())) <= width
    flat = re.sub(r"\s+", "", narrow)
    for name in (LONG, FORMAT, "a|b"):                     # every name whole, wrapped not cut
        assert name in flat
    assert "notfaster:{0}%d|pipe" in flat                    # the reasons too
    assert "1.77M→1.18M" in narrow and "1→0.7 (1.43x)" in narrow
    assert "…" not in narrow


def test_wide_table_when_no_width_is_given():
    rows = [line for line in _wide_report().to_text().splitlines() if LONG in line]
    assert len(rows) == 1 and rows[0].rstrip().endswith("factorised")


def _pty_run(args, cwd, columns=80):
    """The CLI with stdout on a terminal of ``columns`` columns (stderr a pipe)."""
    import fcntl
    import pty
    import struct
    import termios
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.Popen([sys.executable, "-m", "onnxlr", *args], stdout=slave,
                            stderr=subprocess.PIPE, cwd=cwd, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    err = proc.stderr.read().decode()
    proc.wait(timeout=300)
    os.close(master)
    return proc.returncode, b"".join(chunks).decode().replace("\r\n", "\n"), err


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_cli_output_fits_an_80_column_terminal(tmp_path):
    model = tmp_path / "tiny.onnx"
    onnx.save(tiny_cnn(), model)
    rc, out, err = _pty_run(["optimize", str(model), "out.onnx", "--rank", "0.5",
                             "--max-error", "none", "--latency-cache", "none"], tmp_path)
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert lines[-1].startswith("wrote") and any(x.startswith("result: ") for x in lines)
    assert max(map(len, lines)) <= 80, max(lines, key=len)
    assert "\x1b" not in out                                # the report itself has no colours


def test_terminal_progress_has_a_row_per_phase_with_eta():
    from rich.console import Console
    buf = io.StringIO()
    now = [0.0]
    view = console.Terminal(console=Console(file=buf, force_terminal=True, width=80,
                                            color_system=None), clock=lambda: now[0])
    for i in range(4):
        now[0] += 1.0                                       # 4 s of calibration
        view(16 * (i + 1) - 1, 64, "calibration samples")
    for i in range(3):                                     # timing: 10 s per layer
        view(i, 3, f"timing /features/features.{i}/{'very_long_segment/' * 6}Conv")
        now[0] += 10.0
    view.progress.refresh()
    running = ANSI.sub("", buf.getvalue())
    view(0, 2, "sensitivity /a")
    now[0] += 2.0
    view(1, 2, "sensitivity /b")
    now[0] += 100.0                                        # unreported work: checks, timing
    view.close()
    screen = ANSI.sub("", buf.getvalue())
    frames = [f for line in screen.split("\n") for f in line.split("\r")]
    assert max(map(len, frames)) <= 80
    assert "eta" in running and "timing" in running
    assert "…" in running                                 # the long layer name cut to fit
    last = [f for f in frames if f.strip()][-4:]           # the rows left when it is done
    assert [f.split()[1] for f in last] == ["onnxlr", "calibration", "timing", "sensitivity"]
    assert "0:02:15" in last[0]                            # the whole run, unreported work too
    assert "64/64" in last[1] and "0:00:03" in last[1]     # first batch to last batch
    assert "3/3" in last[2] and "0:00:30" in last[2]       # 3 layers of 10 s, not 10 + 100
    assert "2/2" in last[3] and "0:00:04" in last[3]       # 2 items of 2 s, not 2 + 100
    assert not any("eta" in f for f in last)


def test_a_phase_run_again_gets_a_row_of_its_own():
    from rich.console import Console
    buf = io.StringIO()
    view = console.Terminal(console=Console(file=buf, force_terminal=True, width=80,
                                            color_system=None))
    for label in ("timing a", "timing b", "timing pruned a", "timing pruned b"):
        view(0 if label.endswith("a") else 1, 2, label)
    view.close()
    assert len(view.progress.tasks) == 3                     # the run's total + two passes
    assert all(t.finished for t in view.progress.tasks)


def test_log_lines_go_to_the_current_stderr(monkeypatch):
    import logging
    handler = console.StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    buf = io.StringIO()
    monkeypatch.setattr(sys, "stderr", buf)     # what a live progress display does
    handler.emit(logging.LogRecord("x", logging.WARNING, __file__, 1, "hello", None, None))
    assert buf.getvalue() == "hello\n"


# --- one direction for every ratio ----------------------------------------------------------

def test_every_ratio_points_one_way():
    rep = full_report()
    page = "".join(parse_xhtml(render_html(rep)).itertext())
    for text in (rep.to_text(), rep.to_markdown(), page):
        low = text.lower()
        assert "fewer macs" not in low and "mac reduction" not in low
        assert re.search(r"0\.39[x×] MACs", text)               # sizes: after ÷ before
        assert re.search(r"1\.50[x×] faster", text)             # time: the speed-up
        assert not re.search(r"macs \d+\.\d+[x×]", low)          # never "MACs 0.994x"
    assert "-0.0" not in rep.to_text() + rep.to_markdown() + page


def test_changes_never_read_minus_zero():
    assert formats.points(1.0, 0.996) == "−0.4 points"
    assert formats.points(0.98, 0.97999) == "no change"
    assert formats.points(0.5, 0.512) == "+1.2 points"
    assert formats.drop(-0.00001) == "0.0000" and formats.drop(0.0039) == "0.0039"
    rep = full_report()
    rep.accuracy = (0.98, 0.97999)
    assert "-0.0" not in render_html(rep) and "no change" in render_html(rep)


# --- the verdict and its noise --------------------------------------------------------------

def _timed(speedup, low, high):
    rep = full_report()
    rep.latency.update(speedup=speedup, speedup_ci_low=low, speedup_ci_high=high,
                       speedup_p10=low - 0.05, speedup_p90=high + 0.05, iterations=30)
    return rep


def _cards(rep):
    root = parse_xhtml(render_html(rep))
    card = next(d for d in root.iter(f"{XHTML}div") if "card" in (d.get("class") or "")
                and "measured speed-up" in "".join(d.itertext()))
    notes = "".join(d for d in root.itertext())
    return card.get("class"), notes


def test_a_speedup_within_the_noise_is_not_a_verdict():
    rep = _timed(1.02, 0.98, 1.05)
    text = rep.to_text()
    assert "1.02x, within noise ±3%" in text and "1.02x faster" not in text
    cls, page = _cards(rep)
    assert "good" not in cls and "bad" not in cls
    assert "cannot be told from the timing's noise" in page and "slower end to end" not in page
    slower = _timed(0.9, 0.85, 0.95)
    assert "0.90x speed (slower)" in slower.to_text()
    cls, page = _cards(slower)
    assert "bad" in cls and "measured slower end to end (0.90×)" in page
    faster = _timed(2.0, 1.9, 2.1)
    assert "2.00x faster (±5%)" in faster.to_text() and "good" in _cards(faster)[0]


def test_a_lopsided_interval_is_shown_as_it_is():
    lat = {"speedup_ci_low": 1.21, "speedup_ci_high": 8.5}
    assert formats.speed(2.07, lat) == "2.07x faster (95% interval 1.21–8.50x)"
    lat = {"speedup_ci_low": 0.5, "speedup_ci_high": 3.05}
    assert formats.speed(1.02, lat) == "1.02x, within noise (95% interval 0.50–3.05x)"
    assert formats.speed(2.0) == "2.00x faster" and formats.speed(None) == "not measured"


def test_end_to_end_reports_the_interval_of_its_speedup():
    from onnxlr.accept import end_to_end
    from onnxlr.runtime import make_inputs
    model = tiny_cnn()
    lat = end_to_end(model, model, make_inputs(model, batch=2), iterations=12, max_seconds=2)
    assert lat["speedup_p10"] <= lat["speedup_ci_low"] <= lat["speedup"]
    assert lat["speedup"] <= lat["speedup_ci_high"] <= lat["speedup_p90"]


# --- HTML charts ----------------------------------------------------------------------------

def test_integer_axes_get_integer_ticks():
    for lo, hi in ((60, 63.5), (1, 7), (8, 136), (0, 3)):
        ticks = charts.nice_ticks(hi, 4, lo=lo, integer=True)
        assert all(t == int(t) for t in ticks) and ticks[0] <= lo and ticks[-1] >= hi
    svg = ET.fromstring(charts.line_chart("l", [("s", "#000", False, [(63.0, 0.1, ""),
                                                                      (64.0, 0.05, "")])],
                                          None, x_label="rank", y_label="e", integer_x=True))
    ticks = [t.text for t in svg.iter(f"{SVG}text") if t.get("class") == "tick"
             and float(t.get("y")) > 170]
    assert ticks and all(re.fullmatch(r"\d+", t) for t in ticks), ticks


def _panels(rep):
    root = parse_xhtml(render_html(rep))
    return {s.get("aria-label"): s for s in root.iter(f"{SVG}svg")
            if s.get("aria-label", "").startswith("error against rank")}


def test_rings_only_on_kept_layers_and_notes_above_the_plot():
    panels = _panels(full_report())
    kept, reverted = panels[f"error against rank, {HOSTILE}"], panels[f"error against rank, {FORMAT}"]
    ring = [c for c in kept.iter(f"{SVG}circle") if c.get("class") == "chosen"]
    assert len(ring) == 1
    assert not [c for c in reverted.iter(f"{SVG}circle") if c.get("class") == "chosen"]
    assert "reverted: nothing kept" in "".join(reverted.itertext())
    for svg in panels.values():   # every note in the header band, above every point and line
        notes = [t for t in svg.iter(f"{SVG}text") if "annot" in (t.get("class") or "")]
        tops = [float(c.get("cy")) - float(c.get("r")) for c in svg.iter(f"{SVG}circle")
                if c.get("class") != "key"]
        lines = [float(y) for p in svg.iter(f"{SVG}polyline")
                 for y in re.findall(r",([\d.]+)", p.get("points"))]
        assert notes and all(float(t.get("y")) + 3 < min(tops + lines) for t in notes)


def test_panels_share_one_x_axis():
    rep = full_report()   # one layer with two ranks (Tucker), one with one (SVD): MACs for both
    labels = {"".join(t.itertext()) for s in _panels(rep).values()
              for t in s.iter(f"{SVG}text") if t.get("class") == "axis-label"}
    assert "MACs kept (% of the layer)" in labels and "rank" not in labels
    xticks = [[t.text for t in s.iter(f"{SVG}text") if t.get("class") == "tick"
               and t.get("text-anchor") == "middle"] for s in _panels(rep).values()]
    assert len(xticks) == 2 and xticks[0] == xticks[1] and xticks[0][-1] == "100"
    for rec in rep.records:
        if rec.candidates:
            rec.candidates = [c for c in rec.candidates if len(c["ranks"]) == 1] or [
                {**c, "ranks": c["ranks"][:1]} for c in rec.candidates]
    labels = {"".join(t.itertext()) for s in _panels(rep).values()
              for t in s.iter(f"{SVG}text") if t.get("class") == "axis-label"}
    assert "rank" in labels and "MACs kept (% of the layer)" not in labels


def test_status_readable_in_a_narrow_window():
    page = render_html(full_report())
    root = parse_xhtml(page)
    table = next(t for t in root.iter(f"{XHTML}table") if t.find(f"{XHTML}thead") is not None)
    for row in list(table.iter(f"{XHTML}tr"))[1:]:
        first = next(row.iter(f"{XHTML}td"))
        inline = [s for s in first.iter(f"{XHTML}span") if s.get("class") == "inline-status"]
        pills = [s.text for s in inline[0].iter(f"{XHTML}span")
                 if (s.get("class") or "").startswith("pill")] if inline else []
        assert pills and pills[0] in ("factorised", "reverted", "declined")
    narrow = page[page.index("@media (max-width: 1100px)"):]
    hidden = next(rule for rule in narrow.split("}") if "td.status" in rule)
    shown = next(rule for rule in narrow.split("}") if ".inline-status" in rule)
    assert "display: none" in hidden and "display: block" in shown


def test_no_import_cycle_and_html_report_stays_small():
    src = Path(__file__).resolve().parents[1] / "onnxlr"
    tree = ast.parse((src / "html_report.py").read_text())
    runtime_imports = [n for n in tree.body if isinstance(n, ast.ImportFrom)]
    assert "onnxlr.report" not in {n.module for n in runtime_imports}
    assert len((src / "html_report.py").read_text().splitlines()) <= 400


CHROMIUM = next((c for c in ("chromium", "chromium-browser", "google-chrome")
                 if __import__("shutil").which(c)), None)
PROBE = """<script>//<![CDATA[
var rows = [].slice.call(document.querySelectorAll('tr')).filter(function (tr) {
  return tr.querySelector('.inline-status'); });
var seen = rows.map(function (tr) {
  return [].slice.call(tr.querySelectorAll('.pill')).filter(function (e) {
    var r = e.getBoundingClientRect();
    return r.width > 0 && r.left >= 0 && r.right <= window.innerWidth; }).length; });
document.body.setAttribute('data-probe', JSON.stringify({
  scroll: document.documentElement.scrollWidth, inner: window.innerWidth, pills: seen}));
//]]></script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium (Debian: apt-get install "
                    "chromium)")
@pytest.mark.parametrize("width", [760, 1000, 1280])
def test_a_browser_shows_every_status_without_sideways_scrolling(tmp_path, width):
    """The page as a browser lays it out: no horizontal scroll, each layer's status pill
    inside the window."""
    import html
    import json
    page = render_html(_wide_report()).replace("</body>", PROBE + "</body>")
    path = tmp_path / "r.html"
    path.write_text(page, encoding="utf-8")
    done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                           f"--window-size={width},1000", "--dump-dom", path.as_uri()],
                          capture_output=True, text=True, timeout=180)
    probe = json.loads(html.unescape(re.search(r'data-probe="([^"]*)"', done.stdout).group(1)))
    assert probe["scroll"] <= probe["inner"] == width
    assert probe["pills"] and all(n >= 1 for n in probe["pills"])
