"""The report as one self-contained HTML page: summary cards, charts, the per-layer table.

Built from a :class:`~onnxlr.report.Report` alone (records, verification,
latency, profile, budget), like the text and JSON forms. The page has no
script and loads nothing: styles are inline, charts are SVG drawn by
:mod:`onnxlr.charts`, so it opens offline and from a CI artifact. Model names,
doc strings and metadata are data: every piece of text passes through
``html.escape`` and is never used as a format string. The markup is
XML-well-formed (void tags closed, only XML entities), so it parses as XHTML.

Layout, top to bottom: settings · summary cards (speed-up, MACs, efficiency,
params, output error, accuracy, layers) · end to end (MAC reduction next to
the measured speed-up, and where the time goes per layer) · budget · per-layer
latency bars before/after · the layer table (method, rank, params, MACs,
errors, latency, status and why) · candidates of a rank search (error against
rank per layer, speed-up against error) · verification per output.
"""
from __future__ import annotations

from onnxlr import __version__, charts
from onnxlr.charts import AFTER, BEFORE, PALETTE, esc, ms, num
from onnxlr.records import DECLINED, FACTORISED, REVERTED
from onnxlr.report import Report, describe_setup, fmt_value, human

_CSS = """
:root { --fg: #111827; --muted: #6b7280; --line: #e5e7eb; --card: #f8fafc; --accent: #0f766e;
  --good: #15803d; --bad: #b91c1c; --warn: #b45309; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif; color: var(--fg);
  margin: 0; background: #ffffff; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 24px; margin: 0 0 2px; }
h2 { font-size: 17px; margin: 34px 0 6px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
p.lead { margin: 4px 0 12px; color: var(--muted); }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12.5px; }
.source { color: var(--muted); word-break: break-all; }
.chips { margin: 10px 0 0; }
.chip { display: inline-block; border: 1px solid var(--line); border-radius: 999px; padding: 1px 10px;
  margin: 0 6px 6px 0; font-size: 12.5px; background: #ffffff; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(140px, 1fr)); gap: 12px;
  margin-top: 18px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 10px; padding: 12px 14px; }
.card .k { font-size: 12px; color: var(--muted); text-transform: uppercase; letter-spacing: .04em; }
.card .v { font-size: 26px; font-weight: 650; margin: 2px 0; }
.card .s { font-size: 12.5px; color: var(--muted); }
.card.good .v { color: var(--good); } .card.bad .v { color: var(--bad); }
.card.muted .v { color: var(--muted); font-size: 18px; } .card.word .v { font-size: 20px; }
.callout { border-left: 4px solid var(--warn); background: #fffbeb; padding: 8px 12px; margin: 16px 0 0; }
figure { margin: 8px 0 4px; overflow-x: auto; }
figcaption { color: var(--muted); font-size: 12.5px; margin-top: 2px; }
svg.chart { max-width: 100%; height: auto; font-family: inherit; }
svg .label { font-size: 12px; fill: #374151; } svg .value { font-size: 11px; fill: #374151; }
svg .strong { font-weight: 650; } svg .ratio { font-size: 12px; font-weight: 650; }
svg .tick { font-size: 10.5px; fill: var(--muted); } svg .legend { font-size: 11.5px; fill: #374151; }
svg .axis-label { font-size: 11.5px; fill: #374151; } svg .small-title { font-size: 12px; font-weight: 650; }
svg .annot { font-size: 11px; fill: #111827; paint-order: stroke; stroke: #ffffff; stroke-width: 3px; } svg .muted { fill: var(--muted); }
svg .grid { stroke: #eef0f3; stroke-width: 1; } svg .axis, svg .tickmark { stroke: #9ca3af; }
svg .one { stroke: #6b7280; stroke-dasharray: 5 4; stroke-width: 1.2; }
.multiples { display: flex; flex-wrap: wrap; gap: 8px 14px; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { text-align: left; padding: 6px 8px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { font-size: 12px; color: var(--muted); font-weight: 600; white-space: nowrap; }
td.n { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
td .sub { display: block; color: var(--muted); font-size: 12px; }
th.n { text-align: right; } td.status { min-width: 190px; }
details { margin-top: 8px; } summary { cursor: pointer; color: var(--muted); }
.meter { display: inline-block; width: 60px; height: 6px; background: var(--line); border-radius: 3px;
  vertical-align: middle; margin-left: 6px; }
.meter span { display: block; height: 6px; border-radius: 3px; background: var(--accent); }
.meter span.same { background: #c4cad3; }
.callout ul { margin: 4px 0 0; padding-left: 20px; }
.pill { display: inline-block; border-radius: 999px; padding: 0 8px; font-size: 12px; font-weight: 600; }
.pill.factorised { background: #dcfce7; color: #166534; } .pill.reverted { background: #ffedd5; color: #9a3412; }
.pill.declined { background: #f3f4f6; color: #4b5563; }
.reason { color: var(--muted); font-size: 12px; display: block; max-width: 340px; }
.faster { color: var(--good); font-weight: 600; } .slower { color: var(--bad); font-weight: 600; }
footer { margin-top: 40px; color: var(--muted); font-size: 12px; }
"""


#: An accuracy drop (absolute) above this is flagged.
ACCURACY_DROP = 0.01


def render_html(report: Report) -> str:
    """The whole page as a string (UTF-8 text, no external references)."""
    title = f"onnxlr report · {report.source}" if report.source else "onnxlr report"
    parts = [_header(report), _cards(report), _attention(report), _end_to_end(report),
             _budget(report), _layer_latency(report), _table(report), _candidates(report),
             _verification(report)]
    return ("<!DOCTYPE html>\n"
            '<html xmlns="http://www.w3.org/1999/xhtml" lang="en"><head><meta charset="utf-8" />'
            '<meta name="viewport" content="width=device-width, initial-scale=1" />'
            '<meta name="generator" content="onnxlr" />'
            f"<title>{esc(title)}</title><style>{_CSS}</style></head><body><main>"
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


def _cards(r: Report) -> str:
    cards = []
    lat = r.latency or {}
    if r.speedup is not None:
        cards.append(_card("measured speed-up", f"{r.speedup:.2f}×",
                           f"end to end, {describe_setup(lat)}",
                           "good" if r.speedup >= 1 else "bad"))
    else:
        cards.append(_card("measured speed-up", "not measured", "end-to-end timing was off",
                           "muted"))
    red = r.macs_reduction
    cards.append(_card("MAC reduction", f"{red:.2f}×" if red else "all removed",
                       f"{human(r.macs_before)} → {human(r.macs_after)} MACs in candidate "
                       "layers"))
    if r.efficiency is not None:
        cards.append(_card("efficiency", f"{r.efficiency:.2f}",
                           "measured speed-up ÷ MAC reduction"))
    pr = r.params_after / r.params_before if r.params_before else 1.0
    cards.append(_card("parameters", f"{pr:.3f}×", f"{human(r.params_before)} → "
                       f"{human(r.params_after)}"))
    if r.output_error is not None:
        bound = "no bound" if r.max_error is None else (
            f"bound {r.max_error:g} {'met' if r.bound_met else 'EXCEEDED'}")
        cards.append(_card("output error", f"{r.output_error:.3g}", f"worst rel. L2 · {bound}",
                           "" if r.bound_met is None else ("good" if r.bound_met else "bad")))
    else:
        cards.append(_card("output error", "not verified", "ONNX Runtime was not run", "muted"))
    if r.accuracy is not None and r.accuracy[1] is not None:
        drop = r.accuracy[0] - r.accuracy[1]
        cards.append(_card("accuracy", f"{100 * r.accuracy[1]:.1f}%",
                           f"original {100 * r.accuracy[0]:.1f}% ({-100 * drop:+.1f} points)",
                           "bad" if drop > ACCURACY_DROP else ""))
    counts = {s: sum(1 for x in r.shown if x.status == s) for s in (FACTORISED, REVERTED, DECLINED)}
    cards.append(_card("layers factorised", f"{counts[FACTORISED]} of {len(r.shown)}",
                       f"{counts[REVERTED]} reverted · {counts[DECLINED]} declined"))
    return '<section class="cards">' + "".join(cards) + "</section>"


def _attention(r: Report) -> str:
    """Findings a reader should not miss, in words, above the charts."""
    notes = []
    if r.bound_met is False:
        notes.append(f"The output error {r.output_error:.3g} exceeds the bound {r.max_error:g}.")
    if r.accuracy is not None and r.accuracy[1] is not None:
        drop = r.accuracy[0] - r.accuracy[1]
        if drop > ACCURACY_DROP:
            notes.append(f"Accuracy fell from {100 * r.accuracy[0]:.1f}% to "
                         f"{100 * r.accuracy[1]:.1f}% on the labelled inputs.")
    for o in getattr(r.comparison, "outputs", []):
        if o.top1_agreement is not None and o.top1_agreement < 0.9:
            notes.append(f"Output {o.name}: the top-1 class agrees with the original on only "
                         f"{100 * o.top1_agreement:.1f}% of the inputs.")
    if r.speedup is not None and r.speedup < 1:
        notes.append(f"The optimised model measured slower end to end ({r.speedup:.2f}×).")
    slower = []
    for x in r.factorised:
        p = (r.profile or {}).get(x.name) or {}
        before, after = p.get("before_ms"), p.get("after_ms")
        if not (before and after):
            before, after = x.latency_before_ms, x.latency_after_ms
        if before and after and after > before:
            slower.append(f"{x.name} ({before / after:.2f}×)")
    if slower:
        notes.append("Factorised but slower than before: " + ", ".join(slower) + ".")
    if not notes:
        return ""
    return ('<div class="callout"><strong>Look at this first</strong><ul>'
            + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul></div>")


def _profile_speedup(r: Report) -> float | None:
    names = {x.name for x in r.factorised}
    rows = [v for k, v in (r.profile or {}).items() if k in names]
    before = sum(v.get("before_ms") or 0 for v in rows)
    after = sum(v.get("after_ms") or 0 for v in rows)
    return before / after if before and after else None


def _end_to_end(r: Report) -> str:
    lat = r.latency or {}
    items = []
    if r.macs_reduction:
        items.append(("MAC reduction (ideal)", r.macs_reduction, BEFORE))
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
        text = (f"The optimised model ran {r.speedup:.2f}× as fast as the original "
                f"({charts.ms(lat.get('before_ms'))} → {charts.ms(lat.get('after_ms'))} ms; "
                f"{describe_setup(lat)}{iters})")
        if r.efficiency is not None:
            text += (f" for {r.macs_reduction:.2f}× fewer MACs: efficiency {r.efficiency:.2f}, "
                     f"i.e. {r.efficiency * 100:.0f}% of the FLOP saving became time.")
        out.append(f'<p class="lead">{esc(text)}</p>')
    else:
        out.append('<p class="lead">End-to-end latency was not measured; the MAC reduction is '
                   "the ideal speed-up of the factorised layers.</p>")
    if lat.get("returned") == "input":
        rej = lat.get("rejected_speedup")
        rej_text = f" ({rej:.2f}×)" if isinstance(rej, (int, float)) else ""
        out.append(f'<div class="callout">{esc("The factorised model was not faster" + rej_text)}'
                   ": the input model was returned unchanged.</div>")
    out.append("<figure>" + charts.ratio_bars(items, label="MAC reduction and speed-up")
               + "<figcaption>Ratios against the original; the dashed line is 1× (no change)."
               "</figcaption></figure>")
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
        done = x.status == FACTORISED
        p_after = x.params_after if done else x.params_before
        m_after = x.macs_after if done else x.macs_before
        share = 100.0 * m_after / x.macs_before if x.macs_before else 100.0
        ranks = "×".join(map(str, x.ranks)) if x.ranks and x.weight_error is not None else ""
        method = " · ".join(s for s in (x.method or "–", ranks) if s)
        cells = [
            f'<td><code>{_breakable(x.name)}</code><span class="sub">{esc(x.op)} '
            f'{esc("×".join(map(str, x.weight_shape)))}</span></td>',
            f"<td>{esc(method)}<span class=\"sub\">{esc(x.rank_rule or '')}</span></td>",
            f'<td class="n">{esc(human(x.params_before))} → {esc(human(p_after))}</td>',
            f'<td class="n">{esc(human(x.macs_before))} → {esc(human(m_after))}'
            f'<span class="meter" title="{share:.0f}% of the MACs left">'
            f'<span class="{"" if done else "same"}" style="width: {min(100.0, share):.0f}%">'
            "</span></span></td>",
            f'<td class="n">{esc(_err(x.weight_error))}</td>',
            f'<td class="n">{esc(_err(x.output_error))}</td>',
        ]
        if alone:
            cells.append(_ms_cell(x.latency_before_ms, x.latency_after_ms))
        if r.profile:
            p = r.profile.get(x.name) or {}
            cells.append(_ms_cell(p.get("before_ms"), p.get("after_ms")))
        reason = f'<span class="reason">{esc(x.reason)}</span>' if x.reason else ""
        cells.append(f'<td class="status"><span class="pill {esc(x.status)}">{esc(x.status)}'
                     f"</span>{reason}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    numeric = {"params", "MACs", "weight err.", "output err.", "alone ms", "in model ms"}
    return ("<section><h2>Layers</h2><table><thead><tr>"
            + "".join(f'<th class="n">{esc(h)}</th>' if h in numeric else f"<th>{esc(h)}</th>"
                      for h in head) + "</tr></thead><tbody>"
            + "".join(rows) + "</tbody></table></section>")


def _breakable(name: str) -> str:
    """Escaped, with line-break opportunities after each '/' of a long path-like name."""
    return esc(name).replace("/", "/<wbr />")


def _err3(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def _err(v) -> str:
    return "–" if v is None else f"{v:.3g}"


def _tip(name: str, c: dict) -> str:
    bits = [name, "ranks " + "×".join(map(str, c.get("ranks") or [])),
            f"MACs {num(c.get('macs'))}", f"weight err {_err(c.get('weight_error'))}",
            f"local err {_err(c.get('local_error'))}"]
    if c.get("latency_ms") is not None:
        bits.append(f"{ms(c['latency_ms'])} ms")
    return " · ".join(bits) + (" · chosen" if c.get("chosen") else "")


def _error_vs_rank(x, colour: str) -> str:
    cands = [c for c in x.candidates if isinstance(c, dict) and c.get("ranks") is not None
             and (c.get("local_error") is not None or c.get("weight_error") is not None)]
    if len(cands) < 2:
        return ""
    scalar = all(len(c["ranks"]) == 1 for c in cands)
    if scalar:
        xs, x_label = [float(c["ranks"][0]) for c in cands], "rank"
    elif x.macs_before and all(c.get("macs") for c in cands):
        xs = [100.0 * c["macs"] / x.macs_before for c in cands]
        x_label = "MACs kept (% of layer) · ranks grow →"
    else:
        xs, x_label = [float(i) for i in range(len(cands))], "candidate"
    series, chosen = [], None
    for key, col, dashed, name in (("local_error", colour, False, "local"),
                                   ("weight_error", BEFORE, True, "weight")):
        pts = [(xv, float(c[key]), _tip(x.name, c)) for xv, c in zip(xs, cands)
               if c.get(key) is not None]
        if pts:
            series.append((name, col, dashed, pts))
    final = list(x.ranks) if x.status == FACTORISED and x.ranks else None
    marked = [(xv, c) for xv, c in zip(xs, cands)
              if final is not None and list(c["ranks"]) == final]
    label = "kept"
    if not marked:
        marked = [(xv, c) for xv, c in zip(xs, cands) if c.get("chosen")]
        label = "chosen" if final is None else "search chose"
    for xv, c in marked[:1]:
        key = "local_error" if c.get("local_error") is not None else "weight_error"
        text = f"{label} {'×'.join(map(str, c['ranks']))}"
        if label == "search chose":
            text += f" (kept {'×'.join(map(str, final))})"
        chosen = (xv, float(c[key]), text)
    if not series:
        return ""
    return charts.line_chart(x.name, series, chosen, x_label=x_label, y_label="rel. error")


def _scatter_points(r: Report) -> tuple[list[dict], dict[str, str], bool]:
    points, colours = [], {}
    measured = any(isinstance(c, dict) and c.get("latency_ms")
                   for x in r.shown for c in x.candidates)
    for x in r.shown:
        for c in x.candidates:
            if not isinstance(c, dict):
                continue
            err = c.get("local_error")
            if err is None:
                err = c.get("weight_error")
            if measured:
                before = c.get("latency_before_ms") or x.latency_before_ms
                y = c.get("speedup") or (before / c["latency_ms"] if before and c.get("latency_ms")
                                         else None)
            else:
                y = x.macs_before / c["macs"] if c.get("macs") else None
            if err is None or y is None:
                continue
            colours.setdefault(x.name, PALETTE[len(colours) % len(PALETTE)])
            points.append({"x": float(err), "y": float(y), "group": x.name,
                           "chosen": bool(c.get("chosen")), "tip": _tip(x.name, c)})
    return points, colours, measured


def _candidates(r: Report) -> str:
    with_cands = [x for x in r.shown if x.candidates]
    if not with_cands:
        return ""
    colours = {x.name: PALETTE[i % len(PALETTE)] for i, x in enumerate(with_cands)}
    multiples = [_error_vs_rank(x, colours[x.name]) for x in with_cands]
    out = ["<section><h2>Candidates of the rank search</h2>"]
    if any(multiples):
        out.append('<figure><div class="multiples">' + "".join(m for m in multiples if m)
                   + "</div><figcaption>Error against rank per layer: solid, the layer's own "
                   "output error at its real input; dashed, the weight's relative error; the ring "
                   "marks the ranks kept (else those the search chose).</figcaption></figure>")
    points, pcolours, measured = _scatter_points(r)
    if points:
        y_label = "layer speed-up (measured)" if measured else "MAC reduction (not measured)"
        out.append("<figure>" + charts.scatter(points, pcolours, x_label="relative error "
                                               "(local output, else weight)", y_label=y_label)
                   + "<figcaption>Each dot is one candidate rank choice: up is faster, left is "
                   "more accurate; outlined dots were chosen.</figcaption></figure>")
    out.append("</section>")
    return "".join(out)


def _verification(r: Report) -> str:
    if r.comparison is None:
        return ""
    head = ["output", "rel. L2 error", "max abs", "cosine", "top-1 agreement"]
    rows = "".join(
        f"<tr><td><code>{esc(o.name)}</code></td><td class=\"n\">{esc(f'{o.rel_l2:.4g}')}</td>"
        f"<td class=\"n\">{esc(f'{o.max_abs:.4g}')}</td><td class=\"n\">{esc(f'{o.cosine:.5f}')}"
        f"</td><td class=\"n\">{esc(_err3(o.top1_agreement))}"
        "</td></tr>" for o in r.comparison.outputs)
    acc = ""
    if r.accuracy is not None and r.accuracy[1] is not None:
        acc = (f'<p class="lead">Accuracy on the labelled inputs: {r.accuracy[0]:.4f} → '
               f"{r.accuracy[1]:.4f}</p>")
    return (f'<section><h2>Verification</h2><p class="lead">{esc(r.verify_inputs or "")}</p>'
            "<table><thead><tr>" + "".join(f'<th class="{"n" if i else ""}">{esc(h)}</th>'
                                           for i, h in enumerate(head))
            + f"</tr></thead><tbody>{rows}</tbody></table>{acc}</section>")
