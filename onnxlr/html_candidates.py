"""The HTML report's candidate section: error against rank per layer, speed-up against error.

The panels share one x axis meaning: the rank when every layer's candidates have one rank
(integer ticks), else the share of the layer's MACs a candidate keeps, for all of them; a
panel never switches to another unit. The ring marks the ranks a layer *kept*: a layer
whose change was reverted or declined gets none (its header says so), and in the scatter only
the kept layers' candidates are outlined.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from onnxlr import charts
from onnxlr.charts import BEFORE, PALETTE, esc, ms, num

if TYPE_CHECKING:
    from onnxlr.report import Report


def err(v) -> str:
    return "–" if v is None else f"{v:.3g}"


def _ranks(ranks) -> str:
    return "×".join(map(str, ranks or []))


def _final(x) -> list[int]:
    """What the layer kept, in its candidates' terms: the ranks, or a pruned layer's channel
    count (its rungs' one "rank")."""
    if x.ranks:
        return list(x.ranks)
    return [x.kept_channels] if x.kept_channels is not None else []


def _tip(name: str, c: dict, kept: bool) -> str:
    bits = [name, "ranks " + _ranks(c.get("ranks")), f"MACs {num(c.get('macs'))}",
            f"weight err {err(c.get('weight_error'))}", f"local err {err(c.get('local_error'))}"]
    if c.get("latency_ms") is not None:
        bits.append(f"{ms(c['latency_ms'])} ms")
    if c.get("chosen"):
        bits.append("chosen, kept" if kept else "chosen, then reverted")
    return " · ".join(bits)


def _usable(x) -> list[dict]:
    return [c for c in x.candidates if isinstance(c, dict) and c.get("ranks") is not None
            and (c.get("local_error") is not None or c.get("weight_error") is not None)]


def x_axis(layers) -> tuple[str, bool]:
    """One x for every panel: ('rank', True) when all candidates have a single rank, else
    ('macs', False): the MACs a candidate keeps, in % of its layer."""
    cands = [c for x in layers for c in _usable(x)]
    if cands and all(len(c["ranks"]) == 1 for c in cands):
        return "rank", True
    return "macs", False


def _macs_unit(x) -> float:
    """The factor that puts a layer's candidate MACs in its record's unit. The search counts
    a Gemm candidate's MACs for the whole timing batch, the record for one sample: the kept
    candidate, whose MACs the record also holds, gives the factor (1 when they agree)."""
    if not x.changed or not x.macs_after:
        return 1.0
    kept = [c for c in _usable(x) if list(c["ranks"]) == _final(x) and c.get("macs")]
    return x.macs_after / kept[0]["macs"] if kept else 1.0


def _x(kind: str, x, c: dict, unit: float = 1.0) -> float | None:
    if kind == "rank":
        return float(c["ranks"][0])
    return 100.0 * unit * c["macs"] / x.macs_before if c.get("macs") and x.macs_before else None


def error_vs_rank(x, colour: str, kind: str) -> str:
    """One small multiple: the layer's local (solid) and weight (dashed) error per candidate."""
    unit = _macs_unit(x)
    cands = [(xv, c) for c in _usable(x) if (xv := _x(kind, x, c, unit)) is not None]
    if len(cands) < 2:
        return ""
    kept = x.changed
    series = []
    for key, col, dashed, name in (("local_error", colour, False, "local"),
                                   ("weight_error", BEFORE, True, "weight")):
        pts = [(xv, float(c[key]), _tip(x.name, c, kept)) for xv, c in cands
               if c.get(key) is not None]
        if pts:
            series.append((name, col, dashed, pts))
    ring, note = None, f"{x.status}: nothing kept"
    if kept:
        final = _final(x)
        same = [(xv, c) for xv, c in cands if list(c["ranks"]) == final]
        chosen = same or [(xv, c) for xv, c in cands if c.get("chosen")]
        if chosen:
            xv, c = chosen[0]
            key = "local_error" if c.get("local_error") is not None else "weight_error"
            ring = (xv, float(c[key]))
            note = f"kept {_ranks(final)}" + ("" if same else
                                              f" (ring: chosen {_ranks(c['ranks'])})")
        else:
            note = f"kept {_ranks(final)} (not among these)"
    x_label = "rank" if kind == "rank" else "MACs kept (% of the layer)"
    return charts.line_chart(x.name, series, ring, note, x_label=x_label, y_label="rel. error",
                             integer_x=kind == "rank",
                             x_domain=None if kind == "rank" else (0.0, 100.0))


def scatter_points(r: Report) -> tuple[list[dict], dict[str, str], bool]:
    points, colours = [], {}
    measured = any(isinstance(c, dict) and c.get("latency_ms")
                   for x in r.shown for c in x.candidates)
    for x in r.shown:
        kept = x.changed
        for c in x.candidates:
            if not isinstance(c, dict):
                continue
            e = c.get("local_error")
            if e is None:
                e = c.get("weight_error")
            if measured:
                before = c.get("latency_before_ms") or x.latency_before_ms
                y = c.get("speedup") or (before / c["latency_ms"] if before and c.get("latency_ms")
                                         else None)
            else:
                y = x.macs_before / (c["macs"] * _macs_unit(x)) if c.get("macs") else None
            if e is None or y is None:
                continue
            colours.setdefault(x.name, PALETTE[len(colours) % len(PALETTE)])
            points.append({"x": float(e), "y": float(y), "group": x.name,
                           "chosen": bool(c.get("chosen")) and kept, "tip": _tip(x.name, c, kept)})
    return points, colours, measured


def candidates_section(r: Report) -> str:
    with_cands = [x for x in r.shown if x.candidates]
    if not with_cands:
        return ""
    colours = {x.name: PALETTE[i % len(PALETTE)] for i, x in enumerate(with_cands)}
    kind, _ = x_axis(with_cands)
    multiples = [error_vs_rank(x, colours[x.name], kind) for x in with_cands]
    out = ["<section><h2>Candidates of the rank search</h2>"]
    if any(multiples):
        axis = "rank" if kind == "rank" else "the share of the layer's MACs a candidate keeps"
        out.append('<figure><div class="multiples">' + "".join(m for m in multiples if m)
                   + f"</div><figcaption>Error against {esc(axis)}, per layer: solid, the "
                   "layer's own output error at its real input; dashed, the weight's relative "
                   "error; the ring marks the ranks the layer kept (layers whose change was "
                   "reverted or declined have none).</figcaption></figure>")
    points, pcolours, measured = scatter_points(r)
    if points:
        y_label = ("layer speed-up (measured alone)" if measured
                   else "ideal speed-up from MACs (not measured)")
        out.append("<figure>" + charts.scatter(points, pcolours, x_label="relative error "
                                               "(local output, else weight)", y_label=y_label)
                   + "<figcaption>Each dot is one candidate rank choice: up is faster, left is "
                   "more accurate; outlined dots are the ranks a layer kept.</figcaption>"
                   "</figure>")
    out.append("</section>")
    return "".join(out)
