"""The report as one self-contained HTML page: summary cards, charts, the per-layer table.

Built from a :class:`~onnxlr.report.Report` alone (records, verification,
latency, profile, budget), like the text and JSON forms. The page has no
script and loads nothing: styles are inline, charts are SVG drawn by
:mod:`onnxlr.charts`, so it opens offline and from a CI artifact. Model names,
doc strings and metadata are data: every piece of text passes through
``html.escape`` and is never used as a format string. The markup is
XML-well-formed (void tags closed, only XML entities), so it parses as XHTML.

Layout: settings · what happened in one sentence · cards · what to look at · end to end ·
budget · latency per layer · the layer table · candidates (:mod:`onnxlr.html_candidates`) ·
verification. Ratios point one way (:mod:`onnxlr.formats`); a speed-up whose interval holds
1 is "within noise", neither green nor red. Styles: ``report.css`` beside this file; at
1100 px and less (760 included) the table drops secondary columns and puts each status
under the layer's name.
"""
from __future__ import annotations

from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING

from onnxlr import __version__, charts
from onnxlr.charts import AFTER, BEFORE, PALETTE, esc
from onnxlr.formats import (describe_setup, fmt_value, human, interval, kept, layer_error, points,
                            size, speed, uncertain)
from onnxlr.html_candidates import candidates_section, err
from onnxlr.records import DECLINED, FACTORISED, PRUNED, REVERTED

if TYPE_CHECKING:  # the report imports this module to render itself, never the reverse
    from onnxlr.report import Report


@lru_cache(maxsize=1)
def _css() -> str:
    return resources.files("onnxlr").joinpath("report.css").read_text(encoding="utf-8")


#: An accuracy drop (absolute) above this is flagged.
ACCURACY_DROP = 0.01


def render_html(report: Report) -> str:
    """The whole page as a string (UTF-8 text, no external references)."""
    title = f"onnxlr report · {report.source}" if report.source else "onnxlr report"
    parts = [_header(report), _what(report), _cards(report), _attention(report),
             _end_to_end(report), _budget(report), _layer_latency(report), _table(report),
             candidates_section(report), _verification(report)]
    return ("<!DOCTYPE html>\n"
            '<html xmlns="http://www.w3.org/1999/xhtml" lang="en"><head><meta charset="utf-8" />'
            '<meta name="viewport" content="width=device-width, initial-scale=1" />'
            '<meta name="generator" content="onnxlr" />'
            f"<title>{esc(title)}</title><style>{_css()}</style></head><body><main>"
            + "".join(p for p in parts if p)
            + f"<footer>onnxlr {esc(__version__)} · JSON schema onnxlr.report/1 · "
            "latency figures are medians of runs interleaved original/optimised on the machine "
            "that made this report</footer></main></body></html>\n")


def _header(r: Report) -> str:
    chips = [f"method {r.method}", f"rank {r.rank}", f"rank multiple {r.rank_multiple}",
             "max error " + ("none" if r.max_error is None else f"{r.max_error:g}"),
             f"accept {r.accept}", f"{r.seconds:.1f} s"]
    src = f'<div class="source mono">{esc(r.source)}</div>' if r.source else ""
    return ("<header><h1>onnxlr report</h1>" + src + '<div class="chips">'
            + "".join(f'<span class="chip">{esc(c)}</span>' for c in chips) + "</div></header>")


def _card(key: str, value: str, sub: str = "", cls: str = "") -> str:
    return (f'<div class="card {cls}"><div class="k">{esc(key)}</div><div class="v">{esc(value)}'
            f'</div><div class="s">{esc(sub)}</div></div>')


def _speed_class(r: Report) -> str:
    """Green when measured faster, red when slower, neither when the interval holds 1."""
    if r.speedup is None or uncertain(r.speedup, r.latency):
        return ""
    return "good" if r.speedup >= 1 else "bad"


def _metric(r: Report) -> tuple[str, float, float, str] | None:
    """(name, before, after, on what) of the number a reader judges the result by: the
    metric on the inputs the search never saw, else on its held-out set, else accuracy."""
    s = r.search or {}
    ev = s.get("evaluation")
    if ev:
        return s["metric"], ev["score_before"], ev["score_after"], ev.get("inputs") or ""
    if s:
        return s["metric"], s["score_before"], s["score_after"], r.verify_inputs or ""
    if r.accuracy is not None and r.accuracy[1] is not None:
        return "accuracy", r.accuracy[0], r.accuracy[1], "the labelled inputs"
    return None


def _score(name: str, v: float) -> str:
    return f"{100 * v:.1f}%" if name in ("accuracy", "top1") else f"{v:.4f}"


def _what(r: Report) -> str:
    """The first screen's one sentence: what happened."""
    bits = []
    if r.speedup is not None:
        bits.append(f"<strong>{esc(speed(r.speedup, r.latency, '×'))}</strong> end to end")
    bits.append(esc(size(r.macs_after, r.macs_before, "MACs", "×")))
    m = _metric(r)
    if m is not None:
        name, before, after, on = m
        change = f" ({points(before, after)})" if name in ("accuracy", "top1") else ""
        bits.append(f"{esc(name)} <strong>{esc(_score(name, before))} → "
                    f"{esc(_score(name, after))}</strong>{esc(change)}"
                    + (f" on {esc(on)}" if on else ""))
    n = len(r.changed)
    bits.append(f"{n} of {len(r.shown)} layers changed")
    return '<p class="what">' + " · ".join(bits) + "</p>"


def _cards(r: Report) -> str:
    cards = []
    lat = r.latency or {}
    if r.speedup is not None:
        span = interval(lat)
        word = ("within noise" if uncertain(r.speedup, lat) else
                "faster" if r.speedup >= 1 else "slower")
        sub = word + ("" if span is None else f", 95% interval {span[0]:.2f}–{span[1]:.2f}×")
        cards.append(_card("measured speed-up", f"{r.speedup:.2f}×",
                           f"{sub} · end to end, {describe_setup(lat)}", _speed_class(r)))
    else:
        cards.append(_card("measured speed-up", "not measured", "end-to-end timing was off",
                           "muted"))
    red = r.macs_reduction
    cards.append(_card("MACs", size(r.macs_after, r.macs_before, "", "×").strip(),
                       f"{human(r.macs_before)} → {human(r.macs_after)} in candidate layers"
                       + (f"; ideally {speed(red, None, '×')}" if red else "")))
    if r.efficiency is not None:
        cards.append(_card("efficiency", f"{r.efficiency:.2f}",
                           "measured speed-up ÷ ideal speed-up of the MACs"))
    cards.append(_card("parameters", size(r.params_after, r.params_before, "", "×", 3).strip(),
                       f"{human(r.params_before)} → {human(r.params_after)}"))
    if r.output_error is not None:
        bound = "no bound" if r.max_error is None else (
            f"bound {r.max_error:g} {'met' if r.bound_met else 'EXCEEDED'}")
        cards.append(_card("output error", f"{r.output_error:.3g}", f"worst rel. L2 · {bound}",
                           "" if r.bound_met is None else ("good" if r.bound_met else "bad")))
    else:
        cards.append(_card("output error", "not verified", "ONNX Runtime was not run", "muted"))
    m = _metric(r)
    if m is not None:
        name, before, after, _ = m
        change = points(before, after) if name in ("accuracy", "top1") else \
            f"drop {before - after:.4f}".replace("-0.0000", "0.0000")
        cards.append(_card(name, _score(name, after),
                           f"original {_score(name, before)} ({change})",
                           "bad" if before - after > (r.search or {}).get("max_drop",
                                                                      ACCURACY_DROP) else ""))
    counts = {s: sum(1 for x in r.shown if x.status == s)
              for s in (FACTORISED, PRUNED, REVERTED, DECLINED)}
    cards.append(_card("layers changed", f"{counts[FACTORISED] + counts[PRUNED]} of {len(r.shown)}",
                       f"{counts[FACTORISED]} factorised · {counts[PRUNED]} pruned · "
                       f"{counts[REVERTED]} reverted · {counts[DECLINED]} declined"))
    return '<section class="cards">' + "".join(cards) + "</section>"


def _attention(r: Report) -> str:
    """Findings a reader should not miss, in words, above the charts."""
    notes = []
    if r.bound_met is False:
        notes.append(f"The output error {r.output_error:.3g} exceeds the bound {r.max_error:g}."
                     if r.search is None else
                     f"The metric dropped {r.search['drop']:.4g}, over the allowed "
                     f"{r.search['max_drop']:g}.")
    if r.accuracy is not None and r.accuracy[1] is not None:
        drop = r.accuracy[0] - r.accuracy[1]
        if drop > ACCURACY_DROP:
            notes.append(f"Accuracy fell from {100 * r.accuracy[0]:.1f}% to "
                         f"{100 * r.accuracy[1]:.1f}% on the labelled inputs.")
    for o in getattr(r.comparison, "outputs", []):
        if o.top1_agreement is not None and o.top1_agreement < 0.9:
            notes.append(f"Output {o.name}: the top-1 class agrees with the original on only "
                         f"{100 * o.top1_agreement:.1f}% of the inputs.")
    if r.speedup is not None and uncertain(r.speedup, r.latency):
        notes.append(f"The end-to-end speed-up ({speed(r.speedup, r.latency, '×')}) cannot be "
                     "told from the timing's noise on this machine: time it again on a quiet "
                     "one (onnxlr bench) before trusting either way.")
    elif r.speedup is not None and r.speedup < 1:
        notes.append(f"The optimised model measured slower end to end ({r.speedup:.2f}×).")
    slower = []
    for x in r.changed:
        p = (r.profile or {}).get(x.name) or {}
        before, after = p.get("before_ms"), p.get("after_ms")
        if not (before and after):
            before, after = x.latency_before_ms, x.latency_after_ms
        if before and after and after > before:
            slower.append(f"{x.name} ({before / after:.2f}×)")
    if slower:
        notes.append("Changed but slower than before: " + ", ".join(slower) + ".")
    if not notes:
        return ""
    return ('<div class="callout"><strong>Look at this first</strong><ul>'
            + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul></div>")


def _profile_speedup(r: Report) -> float | None:
    names = {x.name for x in r.changed}
    rows = [v for k, v in (r.profile or {}).items() if k in names]
    before = sum(v.get("before_ms") or 0 for v in rows)
    after = sum(v.get("after_ms") or 0 for v in rows)
    return before / after if before and after else None


def _end_to_end(r: Report) -> str:
    lat = r.latency or {}
    items = []
    if r.macs_reduction:
        items.append((f"ideal, from {size(r.macs_after, r.macs_before, 'MACs', '×')}",
                      r.macs_reduction, BEFORE))
    prof = _profile_speedup(r)
    if prof is not None:
        items.append(("factorised layers (profiled)", prof, "#56B4E9"))
    if r.speedup is not None:
        items.append(("measured end to end", r.speedup, AFTER))
    if not items:
        return ""
    out = ["<section><h2>End to end</h2>"]
    if r.speedup is not None:
        iters = f", median of {lat['iterations']} interleaved runs" if lat.get("iterations") else ""
        text = (f"The optimised model: {speed(r.speedup, lat, '×')} "
                f"({charts.ms(lat.get('before_ms'))} → {charts.ms(lat.get('after_ms'))} ms; "
                f"{describe_setup(lat)}{iters})")
        if r.efficiency is not None:
            text += (f", at {size(r.macs_after, r.macs_before, 'MACs', '×')} (ideally "
                     f"{speed(r.macs_reduction, None, '×')}): efficiency {r.efficiency:.2f}, "
                     f"i.e. {r.efficiency * 100:.0f}% of the ideal speed-up became time.")
        out.append(f'<p class="lead">{esc(text)}</p>')
    else:
        out.append('<p class="lead">End-to-end latency was not measured; the ideal speed-up '
                   "is what the MACs alone would give the factorised layers.</p>")
    if lat.get("returned") == "input":
        rej = lat.get("rejected_speedup")
        rej_text = f" ({speed(rej, None, '×')})" if isinstance(rej, (int, float)) else ""
        out.append(f'<div class="callout">{esc("The factorised model was not faster" + rej_text)}'
                   ": the input model was returned unchanged.</div>")
    out.append("<figure>" + charts.ratio_bars(items, label="ideal and measured speed-up")
               + "<figcaption>Speed-ups against the original (time before ÷ after); the dashed "
               "line is 1× (no change).</figcaption></figure>")
    if r.profile:
        out.append(_where_time_goes(r))
    out.append("</section>")
    return "".join(out)


def _layer_colours(r: Report) -> dict[str, str]:
    names = [x.name for x in r.shown if r.profile and x.name in r.profile]
    colours = {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(names)}
    for extra in r.profile or {}:
        if extra not in colours:
            colours[extra] = charts.OTHER_COLOR
    return colours


def _where_time_goes(r: Report) -> str:
    colours = _layer_colours(r)
    rows = [(label, [(k, (r.profile.get(k) or {}).get(key) or 0.0) for k in colours])
            for label, key in (("original", "before_ms"), ("optimised", "after_ms"))]
    return ("<figure>" + charts.stacked_bars(rows, colours, label="time per layer")
            + "<figcaption>Where the time goes: kernel time per layer inside the whole model "
            "(ONNX Runtime profiling, median per layer); grey is every other op.</figcaption>"
            "</figure>")


def _budget(r: Report) -> str:
    b = r.budget
    if not b:
        return ""
    cards = []
    if b.get("target_speedup") is not None:
        got = b.get("achieved_speedup", r.speedup)
        cards.append(_card("target speed-up", f"{b['target_speedup']:g}×",
                           "achieved " + ("–" if got is None else f"{got:.2f}×")))
    if b.get("target_flops") is not None:
        got = b.get("achieved_macs_ratio")
        cards.append(_card("target MACs", f"{b['target_flops']:g}×",
                           "achieved " + ("–" if got is None else f"{got:.3f}×")))
    if "target_met" in b:
        met = bool(b["target_met"])
        cards.append(_card("target", "met" if met else "not met", str(b.get("bound") or ""),
                           "word " + ("good" if met else "bad")))
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(fmt_value(v))}</td></tr>"
                   for k, v in b.items())
    return ('<section><h2>Budget</h2><div class="cards">' + "".join(cards) + "</div>"
            f"<details><summary>all budget figures</summary><table>{rows}</table></details>"
            "</section>")


def _layer_latency(r: Report) -> str:
    if r.profile:
        rows = [(x.name, (r.profile.get(x.name) or {}).get("before_ms"),
                 (r.profile.get(x.name) or {}).get("after_ms")) for x in r.shown]
        shown = {x.name for x in r.shown}
        rows += [(k, v.get("before_ms"), v.get("after_ms")) for k, v in r.profile.items()
                 if k not in shown]
        what = ("Kernel time of each layer inside the whole model (ONNX Runtime profiling; the "
                "factorised parts of a layer count together), median over runs.")
    else:
        rows = [(x.name, x.latency_before_ms, x.latency_after_ms) for x in r.shown
                if x.latency_before_ms or x.latency_after_ms]
        what = ("Each layer timed alone at its real input: original node against its "
                "factorised chain.")
    if not rows:
        return ""
    return ("<section><h2>Latency per layer</h2><figure>"
            + charts.paired_bars(rows, label="latency per layer before and after", fmt=charts.ms)
            + f"<figcaption>{esc(what)} Right: speed-up.</figcaption></figure></section>")


def _ms_cell(before, after) -> str:
    if before is None and after is None:
        return '<td class="n">–</td>'
    ratio = ""
    if before and after:
        x = before / after
        cls = "faster" if x >= 1.03 else "slower" if x <= 0.97 else ""
        ratio = f'<span class="sub {cls}">{x:.2f}×</span>'
    return f'<td class="n">{esc(charts.ms(before))} → {esc(charts.ms(after))}{ratio}</td>'


def _table(r: Report) -> str:
    if not r.shown:
        return "<section><h2>Layers</h2><p class=\"lead\">No candidate layers.</p></section>"
    alone = any(x.latency_before_ms or x.latency_after_ms for x in r.shown)
    head = ["layer", "method · rank", "params", "MACs", "weight err.", "output err."]
    head += (["alone ms"] if alone else []) + (["in model ms"] if r.profile else []) + ["status"]
    rows = []
    for x in r.shown:
        done = x.changed
        p_after = x.params_after if done else x.params_before
        m_after = x.macs_after if done else x.macs_before
        share = 100.0 * m_after / x.macs_before if x.macs_before else 100.0
        ranks = kept(x, "×", "")
        method = " · ".join(s for s in (x.method or "–", ranks) if s)
        reason = f'<span class="reason">{esc(x.reason)}</span>' if x.reason else ""
        pill = f'<span class="pill {esc(x.status)}">{esc(x.status)}</span>'
        cells = [
            f'<td><code>{_breakable(x.name)}</code><span class="sub">{esc(x.op)} '
            f'{esc("×".join(map(str, x.weight_shape)))}</span>'
            f'<span class="inline-status">{pill}{reason}</span></td>',
            f"<td>{esc(method)}<span class=\"sub\">{esc(x.rank_rule or '')}</span></td>",
            f'<td class="n">{esc(human(x.params_before))} → {esc(human(p_after))}</td>',
            f'<td class="n">{esc(human(x.macs_before))} → {esc(human(m_after))}'
            f'<span class="meter" title="{share:.0f}% of the MACs left">'
            f'<span class="{"" if done else "same"}" style="width: {min(100.0, share):.0f}%">'
            "</span></span></td>",
            f'<td class="n secondary">{esc(layer_error(x, ".3g", "–"))}</td>',
            f'<td class="n">{esc(err(x.output_error))}</td>',
        ]
        if alone:
            cells.append(_ms_cell(x.latency_before_ms, x.latency_after_ms))
        if r.profile:
            p = r.profile.get(x.name) or {}
            cells.append(_ms_cell(p.get("before_ms"), p.get("after_ms")))
        cells.append(f'<td class="status">{pill}{reason}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    numeric = {"params", "MACs", "weight err.", "output err.", "alone ms", "in model ms"}
    cls = {h: " ".join(c for c in ("n" if h in numeric else "",
                                   "secondary" if h == "weight err." else "",
                                   "status" if h == "status" else "") if c) for h in head}
    return ("<section><h2>Layers</h2><table><thead><tr>"
            + "".join(f'<th class="{cls[h]}">{esc(h)}</th>' if cls[h] else f"<th>{esc(h)}</th>"
                      for h in head) + "</tr></thead><tbody>"
            + "".join(rows) + "</tbody></table></section>")


def _breakable(name: str) -> str:
    """Escaped, with line-break opportunities after each '/' of a long path-like name."""
    return esc(name).replace("/", "/<wbr />")


def _fixed3(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def _verification(r: Report) -> str:
    if r.comparison is None:
        return ""
    head = ["output", "rel. L2 error", "max abs", "cosine", "top-1 agreement"]
    rows = "".join(
        f"<tr><td><code>{esc(o.name)}</code></td><td class=\"n\">{esc(f'{o.rel_l2:.4g}')}</td>"
        f"<td class=\"n\">{esc(f'{o.max_abs:.4g}')}</td><td class=\"n\">{esc(f'{o.cosine:.5f}')}"
        f"</td><td class=\"n\">{esc(_fixed3(o.top1_agreement))}"
        "</td></tr>" for o in r.comparison.outputs)
    acc = ""
    if r.accuracy is not None and r.accuracy[1] is not None:
        acc = (f'<p class="lead">Accuracy on the labelled inputs: {r.accuracy[0]:.4f} → '
               f"{r.accuracy[1]:.4f}</p>")
    return (f'<section><h2>Verification</h2><p class="lead">{esc(r.verify_inputs or "")}</p>'
            "<table><thead><tr>" + "".join(f'<th class="{"n" if i else ""}">{esc(h)}</th>'
                                           for i, h in enumerate(head))
            + f"</tr></thead><tbody>{rows}</tbody></table>{acc}</section>")
