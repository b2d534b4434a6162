"""How numbers are written, the same way in the terminal, Markdown and HTML.

One direction for every ratio:

- sizes (MACs, parameters) are **after ÷ before**, written ``0.25x MACs``: smaller is better;
- time is **before ÷ after** (the speed-up), written ``2.72x faster`` (``0.93x speed
  (slower)`` below 1): larger is better;
- a change of a score in points is **after − before**, ``−0.4 points``, never ``-0.0``.

A measured speed-up is the median of the interleaved timing's per-round ratios (original ÷
result in each round, :func:`onnxlr.runtime.interleaved_latency`) and comes with a 95%
interval of that median; when the interval holds 1, the verdict is "within noise ±N%", not
"faster" or "slower".

Both :mod:`onnxlr.report` and :mod:`onnxlr.html_report` import from here (and not from
each other).
"""
from __future__ import annotations

from typing import Any

from onnxlr.records import DECLINED


def human(n: float) -> str:
    """1234567 → '1.23M' (params, MACs)."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def ratio(after: float, before: float) -> float:
    """after ÷ before, 1.0 when there was nothing before."""
    return after / before if before else 1.0


def times(x: float, digits: int = 2, sign: str = "x") -> str:
    """'0.25x' (``sign='×'`` for HTML)."""
    return f"{x:.{digits}f}{sign}"


def size(after: float, before: float, what: str, sign: str = "x", digits: int = 2) -> str:
    """'0.25x MACs': the size after as a multiple of before."""
    return f"{times(ratio(after, before), digits, sign)} {what}"


def speed_word(x: float) -> str:
    return "faster" if x >= 1 else "speed (slower)"


def noise(lat: dict | None) -> tuple[float, float] | None:
    """(p10, p90) of the per-round speed-ups of an end-to-end timing, if it has them."""
    lat = lat or {}
    lo, hi = lat.get("speedup_p10", lat.get("p10")), lat.get("speedup_p90", lat.get("p90"))
    if isinstance(lo, (int, float)) and isinstance(hi, (int, float)):
        return float(lo), float(hi)
    return None


def interval(lat: dict | None) -> tuple[float, float] | None:
    """The 95% interval of the median speed-up (else, from older reports, the rounds' p10–p90:
    wider, so never a verdict the data cannot carry)."""
    lat = lat or {}
    lo, hi = lat.get("speedup_ci_low"), lat.get("speedup_ci_high")
    if isinstance(lo, (int, float)) and isinstance(hi, (int, float)):
        return float(lo), float(hi)
    return noise(lat)


def uncertain(x: float | None, lat: dict | None) -> bool:
    """True when the speed-up's interval holds 1: faster or slower cannot be told apart."""
    span = interval(lat)
    return x is not None and span is not None and span[0] <= 1.0 <= span[1]


def plus_minus(x: float, lat: dict | None) -> str | None:
    """Half the interval's width, in percent of the median speed-up: '3', '0.4'."""
    span = interval(lat)
    if span is None or not x:
        return None
    value = 100 * (span[1] - span[0]) / 2 / x
    return f"{value:.0f}" if value >= 0.95 else f"{value:.1f}"


def spread(x: float, lat: dict | None, sign: str = "x") -> str:
    """'±3%' for a roughly symmetric interval, else the interval itself ('95% interval
    1.21–8.50x'): a ±160% would claim a lower end below zero."""
    span = interval(lat)
    if span is None or not x:
        return ""
    below, above = max(x - span[0], 0.0), max(span[1] - x, 0.0)
    if max(below, above) <= 2 * max(min(below, above), 0.005 * x):
        return f"±{plus_minus(x, lat)}%"
    return f"95% interval {span[0]:.2f}–{span[1]:.2f}{sign}"


def speed(x: float | None, lat: dict | None = None, sign: str = "x") -> str:
    """'2.72x faster', '0.93x speed (slower)', or '1.02x, within noise ±3%' when the
    median's 95% interval holds 1; '2.72x faster (±9%)' when the interval is known."""
    if x is None:
        return "not measured"
    noise_text = spread(x, lat, sign)
    if uncertain(x, lat):
        wrapped = noise_text if noise_text.startswith("±") else f"({noise_text})"
        return f"{times(x, 2, sign)}, within noise {wrapped}"
    text = f"{times(x, 2, sign)} {speed_word(x)}"
    return text + (f" ({noise_text})" if noise_text else "")


def points(before: float, after: float, digits: int = 1) -> str:
    """after − before in points of a fraction: '−0.4 points', '+0.2 points', 'no change'."""
    delta = round(100 * (after - before), digits)
    if delta == 0:
        return "no change"
    return f"{'+' if delta > 0 else '−'}{abs(delta):.{digits}f} points"


def drop(value: float, digits: int = 4) -> str:
    """A metric's drop (before − after; positive = worse) without a '-0.0000'."""
    text = f"{value:.{digits}f}"
    return text.lstrip("-") if float(text) == 0 else text


def ms_pair(before: float | None, after: float | None) -> str:
    """'0.251→0.122 (2.06x)' (the ratio is the speed-up), or '-' when nothing was measured."""
    if before is None and after is None:
        return "-"
    text = f"{_ms(before)}→{_ms(after)}"
    if before and after:
        text += f" ({before / after:.2f}x)"
    return text


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"


def describe_setup(lat: dict) -> str:
    """'cpu, 1 thread, batch 1' from a latency dict."""
    threads = lat.get("threads")
    parts = [str(lat.get("provider") or "cpu"),
             "ORT default threads" if threads is None else
             f"{threads} thread{'s' if threads != 1 else ''}"]
    if lat.get("batch") is not None:
        parts.append(f"batch {lat['batch']}")
    return ", ".join(parts)


def fmt_value(v: Any) -> str:
    """A budget value for one line of text."""
    if isinstance(v, bool) or v is None:
        return str(v).lower() if v is not None else "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {fmt_value(x)}" for k, x in v.items()) + "}"
    return str(v)


def kept(rec: Any, sign: str = "x", empty: str = "-") -> str:
    """What a layer record kept: a factorised layer's ranks ('8x4'), a pruned layer's channels
    ('24 ch') or a recurrent layer's hidden units per direction ('256 units'); ``empty`` for
    a layer that was never built (declined)."""
    if rec.ranks and rec.weight_error is not None:
        return sign.join(map(str, rec.ranks))
    if rec.kept_channels is not None and rec.status != DECLINED:
        return f"{rec.kept_channels} {'units' if getattr(rec, 'kind', '') == 'rnn' else 'ch'}"
    return empty


def layer_error(rec: Any, spec: str = ".3f", empty: str = "-") -> str:
    """A layer's own error: a factorised layer's weight error ('0.123'), a pruned layer's
    output error on its fitting samples, marked as such ('fit 0.012')."""
    if rec.weight_error is not None:
        return format(rec.weight_error, spec)
    if rec.fit_error is not None:
        return "fit " + format(rec.fit_error, spec)
    return empty
