"""Small SVG charts for the HTML report, drawn by hand.

The report must open offline, from a CI artifact or an e-mail, and must not run
anything: so no JavaScript charting library, no fonts or styles from the
network, just inline SVG. Hover text uses SVG ``<title>`` (a tooltip without
script). Every label passes through :func:`esc` (names and metadata of a model
are data, possibly hostile), and the markup is XML-well-formed so the page
also parses as XHTML. Geometry is linear: a bar's length is proportional to its
value (``data-value`` carries the number it was drawn from).
"""
from __future__ import annotations

import math

from onnxlr import escape

#: Okabe–Ito colours (distinguishable with colour-vision deficiencies), then a few more.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442",
           "#332288", "#88CCEE", "#44AA99", "#AA4499", "#882255"]
BEFORE, AFTER, OTHER_COLOR, GOOD, BAD = "#a3acb9", "#0f766e", "#d5d9e0", "#15803d", "#b91c1c"
FONT = 12


#: Text or attribute value, escaped for HTML/SVG (:func:`onnxlr.escape.html`).
esc = escape.html


def num(v: float | None, digits: int = 3) -> str:
    """Compact number: 0.0123, 1.58, 12.3k, 4.97M; '–' for None."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–" if v is None else str(v)
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.{digits}g}{unit}"
    return f"{v:.{digits}g}"


def ms(v: float | None) -> str:
    """Milliseconds: 0.0123, 1.58, 462, 1234 (no 'k': 1k ms reads as 1000 seconds to some)."""
    if v is None:
        return "–"
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"


def ratio_colour(x: float) -> str:
    """Green when clearly faster, red when clearly slower, grey within ±3%."""
    return GOOD if x >= 1.03 else BAD if x <= 0.97 else "#6b7280"


def shorten(label: str, n: int = 34) -> str:
    """Keep the end of a long layer name (its most specific part): '…features.1.0/Conv'."""
    label = str(label)
    if len(label) <= n:
        return label
    tail = label[-(n - 1):]
    cut = tail.find("/")
    if 0 <= cut < len(tail) - 8:  # start at a path segment when one is near
        tail = tail[cut:]
    return "…" + tail


def nice_ticks(hi: float, count: int = 5, lo: float = 0.0, integer: bool = False) -> list[float]:
    """Round tick values (1, 2, 2.5, 5 × 10^k) covering [lo, hi]; with ``integer`` (ranks,
    counts), whole numbers only: steps of at least 1 and never 2.5."""
    if not hi > lo:
        hi = lo + 1.0
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    steps = (1, 2, 5, 10) if integer else (1, 2, 2.5, 5, 10)
    step = next(m * mag for m in steps if m * mag >= raw)
    if integer:
        step = max(1, round(step))
    start = math.floor(lo / step) * step
    ticks, t = [], start
    while t <= hi + step * 0.999:
        ticks.append(float(round(t)) if integer else round(t, 12))
        t += step
    return ticks


def _svg(width: float, height: float, body: list[str], label: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" '
            f'aria-label="{esc(label)}" viewBox="0 0 {width:.0f} {height:.0f}" '
            f'width="{width:.0f}" height="{height:.0f}">' + "".join(body) + "</svg>")


def _text(x: float, y: float, text: str, *, anchor: str = "start", cls: str = "",
          fill: str | None = None, size: int | None = None) -> str:
    extra = (f' fill="{fill}"' if fill else "") + (f' font-size="{size}"' if size else "")
    cls_attr = f' class="{cls}"' if cls else ""
    return (f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{cls_attr}{extra}>'
            f"{esc(text)}</text>")


def _legend(x: float, y: float, items: list[tuple[str, str]],
            width: float) -> tuple[list[str], float]:
    """Colour swatches with labels, wrapped to ``width``; returns markup and the height used."""
    out, cx, cy = [], x, y
    for label, colour in items:
        w = 18 + 7 * len(label) + 14
        if cx + w > x + width and cx > x:
            cx, cy = x, cy + 18
        out.append(f'<rect x="{cx:.1f}" y="{cy - 9:.1f}" width="11" height="11" rx="2" '
                   f'fill="{colour}" />')
        out.append(_text(cx + 16, cy, label, cls="legend"))
        cx += w
    return out, cy - y + 18


def paired_bars(rows: list[tuple[str, float | None, float | None]], *, unit: str = "ms",
                names: tuple[str, str] = ("original", "optimised"), label: str = "",
                fmt=num) -> str:
    """Horizontal bars, two per row (before grey, after teal), the ratio at the right.

    Args:
        rows: (label, before, after); None draws no bar.
        unit: appended to the value labels.
        fmt: number formatter of the value labels.
        names: legend names of the two bars.
    """
    label_w, bar_w, right_w, row_h, top = 250, 470, 80, 36, 30
    vmax = max([v for _, b, a in rows for v in (b, a) if v is not None] or [1.0]) or 1.0
    ticks = nice_ticks(vmax)
    scale = bar_w / ticks[-1]
    height = top + row_h * len(rows) + 28
    width = label_w + bar_w + right_w + 60
    body, _ = _legend(label_w, 16, [(names[0], BEFORE), (names[1], AFTER)], bar_w)
    for t in ticks:
        x = label_w + t * scale
        body.append(f'<line class="grid" x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" '
                    f'y2="{height - 24}" />')
        body.append(_text(x, height - 8, f"{fmt(t)} {unit}" if t == ticks[-1] else fmt(t),
                          anchor="middle", cls="tick"))
    for i, (name, before, after) in enumerate(rows):
        y = top + i * row_h
        body.append(f"<g><title>{esc(name)}: {esc(fmt(before))} → {esc(fmt(after))} "
                    f"{esc(unit)}</title>")
        body.append(_text(label_w - 8, y + 18, shorten(name), anchor="end", cls="label"))
        for j, (value, colour, cls) in enumerate(((before, BEFORE, "before"),
                                                  (after, AFTER, "after"))):
            by = y + 4 + j * 13
            if value is None:
                body.append(_text(label_w + 4, by + 10, "–", cls="value"))
                continue
            w = max(0.0, value) * scale
            body.append(f'<rect class="bar {cls}" x="{label_w}" y="{by}" width="{w:.2f}" '
                        f'height="12" rx="2" fill="{colour}" data-value="{float(value)!r}" />')
            body.append(_text(label_w + w + 4, by + 10, fmt(value), cls="value"))
        if before and after:
            ratio = before / after
            body.append(_text(label_w + bar_w + right_w + 40, y + 20, f"{ratio:.2f}×",
                              anchor="end", cls="ratio", fill=ratio_colour(ratio)))
        body.append("</g>")
    return _svg(width, height, body, label or "bars before and after")


def stacked_bars(rows: list[tuple[str, list[tuple[str, float]]]], colours: dict[str, str], *,
                 unit: str = "ms", label: str = "") -> str:
    """One horizontal bar per row, split into segments (e.g. each layer's share of the time).

    Args:
        rows: (row label, [(segment name, value)]).
        colours: segment name → colour (missing: grey).
    """
    label_w, bar_w, right_w, row_h, top = 110, 640, 90, 34, 8
    totals = [sum(max(0.0, v) for _, v in segs) for _, segs in rows]
    scale = bar_w / (max(totals or [1.0]) or 1.0)
    body: list[str] = []
    for i, (name, segs) in enumerate(rows):
        y = top + i * row_h
        body.append(_text(label_w - 8, y + 17, name, anchor="end", cls="label"))
        x = float(label_w)
        for seg, value in segs:
            w = max(0.0, value) * scale
            if w <= 0:
                continue
            body.append(f'<rect class="segment" x="{x:.2f}" y="{y}" width="{w:.2f}" height="24" '
                        f'fill="{colours.get(seg, OTHER_COLOR)}" stroke="#ffffff" '
                        f'stroke-width="1" data-value="{float(value)!r}"><title>{esc(seg)}: '
                        f"{esc(num(value))} {esc(unit)}</title></rect>")
            x += w
        total = ms(totals[i]) if unit == "ms" else num(totals[i])
        body.append(_text(x + 6, y + 17, f"{total} {unit}", cls="value"))
    legend_items = [(shorten(k, 28), c) for k, c in colours.items()]
    leg, leg_h = _legend(label_w, top + row_h * len(rows) + 14, legend_items, bar_w + right_w)
    height = top + row_h * len(rows) + 14 + leg_h
    return _svg(label_w + bar_w + right_w, height, body + leg, label or "stacked bars")


def ratio_bars(items: list[tuple[str, float, str]], *, label: str = "") -> str:
    """Ratios (×) as bars on one scale, with a line at 1× (e.g. MAC reduction vs speed-up)."""
    label_w, bar_w, row_h, top = 230, 480, 30, 6
    vmax = max([v for _, v, _ in items] + [1.0])
    ticks = nice_ticks(vmax, 4)
    scale = bar_w / ticks[-1]
    height = top + row_h * len(items) + 26
    body: list[str] = []
    for t in ticks:
        x = label_w + t * scale
        body.append(f'<line class="grid" x1="{x:.1f}" y1="{top}" x2="{x:.1f}" '
                    f'y2="{height - 22}" />')
        body.append(_text(x, height - 7, f"{num(t)}×", anchor="middle", cls="tick"))
    one = label_w + scale
    body.append(f'<line class="one" x1="{one:.1f}" y1="{top}" x2="{one:.1f}" y2="{height - 22}" />')
    for i, (name, value, colour) in enumerate(items):
        y = top + i * row_h
        w = max(0.0, value) * scale
        body.append(_text(label_w - 8, y + 16, name, anchor="end", cls="label"))
        body.append(f'<rect class="bar" x="{label_w}" y="{y + 3}" width="{w:.2f}" height="18" '
                    f'rx="2" fill="{colour}" data-value="{float(value)!r}" />')
        body.append(_text(label_w + w + 6, y + 17, f"{value:.2f}×", cls="value strong"))
    return _svg(label_w + bar_w + 70, height, body, label or "ratios")


class Axes:
    """Linear x/y mapping of a plot area inside an SVG of the given size."""

    def __init__(self, width: float, height: float, xs: list[float], ys: list[float], *,
                 margin: tuple[float, float, float, float] = (28, 14, 40, 52),
                 y_from_zero: bool = True, x_from_zero: bool = False, integer_x: bool = False):
        self.width, self.height = width, height
        self.top, self.right, self.bottom, self.left = margin
        xlo = 0.0 if x_from_zero else min(xs)
        ylo = 0.0 if y_from_zero else min(ys)
        if integer_x:
            xlo = math.floor(xlo)
        self.xticks = (nice_ticks(max(xs), 4, lo=xlo, integer=integer_x) if max(xs) > xlo
                       else [xlo, xlo + 1])
        self.yticks = nice_ticks(max(ys), 4, lo=ylo) if max(ys) > ylo else [ylo, ylo + 1]

    def x(self, v: float) -> float:
        lo, hi = self.xticks[0], self.xticks[-1]
        return self.left + (v - lo) / (hi - lo) * (self.width - self.left - self.right)

    def y(self, v: float) -> float:
        lo, hi = self.yticks[0], self.yticks[-1]
        span = self.height - self.top - self.bottom
        return self.height - self.bottom - (v - lo) / (hi - lo) * span

    def frame(self, x_label: str, y_label: str, x_fmt=num) -> list[str]:
        out = []
        for t in self.yticks:
            y = self.y(t)
            out.append(f'<line class="grid" x1="{self.left}" y1="{y:.1f}" '
                       f'x2="{self.width - self.right}" y2="{y:.1f}" />')
            out.append(_text(self.left - 5, y + 4, num(t), anchor="end", cls="tick"))
        for t in self.xticks:
            x = self.x(t)
            out.append(f'<line class="tickmark" x1="{x:.1f}" y1="{self.height - self.bottom}" '
                       f'x2="{x:.1f}" y2="{self.height - self.bottom + 4}" />')
            out.append(_text(x, self.height - self.bottom + 16, x_fmt(t), anchor="middle",
                             cls="tick"))
        out.append(f'<line class="axis" x1="{self.left}" y1="{self.height - self.bottom}" '
                   f'x2="{self.width - self.right}" y2="{self.height - self.bottom}" />')
        out.append(_text((self.left + self.width - self.right) / 2, self.height - 6, x_label,
                         anchor="middle", cls="axis-label"))
        out.append(f'<text class="axis-label" text-anchor="middle" transform="translate(13 '
                   f'{(self.top + self.height - self.bottom) / 2:.1f}) rotate(-90)">'
                   f"{esc(y_label)}</text>")
        return out


def line_chart(title: str, series: list[tuple[str, str, bool, list[tuple[float, float, str]]]],
               ring: tuple[float, float] | None, note: str = "", *, x_label: str, y_label: str,
               integer_x: bool = False, x_domain: tuple[float, float] | None = None,
               width: float = 300, height: float = 214) -> str:
    """Small multiple: lines through points, one ringed (the kept candidate).

    The note (what the ring marks, or that nothing was kept) is written in the header band
    above the plot, next to a ring of the same kind, so it never covers a line or a point.

    Args:
        series: (name, colour, dashed, [(x, y, tooltip)]).
        ring: (x, y) to ring, or None.
        note: the header's second line.
        integer_x: whole-number x ticks (ranks).
        x_domain: an x range every panel of a set shows (e.g. 0–100 %), so that panels
            compare at a glance.
    """
    pts = [(x, y) for _, _, _, s in series for x, y, _ in s]
    if not pts:
        return ""
    xs = [p[0] for p in pts] + list(x_domain or ())
    ax = Axes(width, height, xs, [p[1] for p in pts], integer_x=integer_x,
              margin=(42, 14, 40, 52))
    body = [_text(8, 16, shorten(title, 40), cls="small-title"), f"<title>{esc(title)}</title>"]
    if note:
        if ring is not None:
            body.append('<circle class="key" cx="14" cy="30" r="5" fill="none" '
                        'stroke="#111827" stroke-width="2" />')
        body.append(_text(24 if ring is not None else 8, 34, shorten(note, 44),
                          cls="annot" if ring is not None else "annot muted"))
    body += ax.frame(x_label, y_label)
    for _, colour, dashed, s in series:
        s = sorted(s)
        if len(s) > 1:
            path = " ".join(f"{ax.x(x):.1f},{ax.y(y):.1f}" for x, y, _ in s)
            dash = ' stroke-dasharray="4 3"' if dashed else ""
            body.append(f'<polyline points="{path}" fill="none" stroke="{colour}" '
                        f'stroke-width="2"{dash} />')
        for x, y, tip in s:
            body.append(f'<circle cx="{ax.x(x):.1f}" cy="{ax.y(y):.1f}" r="3" fill="{colour}">'
                        f"<title>{esc(tip)}</title></circle>")
    if ring is not None:
        body.append(f'<circle class="chosen" cx="{ax.x(ring[0]):.1f}" cy="{ax.y(ring[1]):.1f}" '
                    'r="7" fill="none" stroke="#111827" stroke-width="2" />')
    return _svg(width, height, body, f"error against rank, {title}")


def scatter(points: list[dict], colours: dict[str, str], *, x_label: str, y_label: str,
            hline: float | None = 1.0, width: float = 860, height: float = 360) -> str:
    """Points {x, y, group, chosen, tip}, coloured by group; chosen ones large and outlined."""
    if not points:
        return ""
    legend_w = 220
    ys = [p["y"] for p in points] + ([hline] if hline is not None else [])
    ax = Axes(width - legend_w, height, [p["x"] for p in points], ys, x_from_zero=True,
              margin=(16, 14, 40, 52))
    body = ax.frame(x_label, y_label)
    if hline is not None:  # explained in the legend, not written over the points
        y = ax.y(hline)
        body.append(f'<line class="one" x1="{ax.left}" y1="{y:.1f}" x2="{ax.width - ax.right}" '
                    f'y2="{y:.1f}" />')
    for p in sorted(points, key=lambda p: p.get("chosen", False)):  # chosen drawn on top
        colour = colours.get(p["group"], OTHER_COLOR)
        big = p.get("chosen")
        stroke = ' stroke="#111827" stroke-width="2"' if big else ' fill-opacity="0.75"'
        body.append(f'<circle class="{"chosen" if big else "point"}" cx="{ax.x(p["x"]):.1f}" '
                    f'cy="{ax.y(p["y"]):.1f}" r="{7 if big else 4}" fill="{colour}"{stroke}>'
                    f"<title>{esc(p.get('tip', ''))}</title></circle>")
    leg = []
    for i, (group, colour) in enumerate(list(colours.items())[:12]):
        y = 24 + i * 20
        leg.append(f'<circle cx="{width - legend_w + 16}" cy="{y - 4}" r="5" fill="{colour}" />')
        leg.append(_text(width - legend_w + 26, y, shorten(group, 28), cls="legend"))
    if len(colours) > 12:
        leg.append(_text(width - legend_w + 26, 24 + 12 * 20, f"… {len(colours) - 12} more",
                         cls="legend muted"))
    leg.append(f'<circle cx="{width - legend_w + 16}" cy="{height - 30}" r="7" fill="none" '
               f'stroke="#111827" stroke-width="2" />')
    leg.append(_text(width - legend_w + 28, height - 26, "ranks kept", cls="legend"))
    if hline is not None:
        leg.append(f'<line class="one" x1="{width - legend_w + 8}" y1="{height - 54}" '
                   f'x2="{width - legend_w + 24}" y2="{height - 54}" />')
        leg.append(_text(width - legend_w + 28, height - 50, f"{num(hline)}× (no faster)",
                         cls="legend"))
    return _svg(width, height, body + leg, "speed-up against error of the candidates")
