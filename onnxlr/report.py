"""The report: built from the per-layer records alone, rendered as text, JSON, Markdown (HTML
in :mod:`onnxlr.html_report`).

The text table is what the CLI prints; Markdown suits a pull-request comment.
The JSON form has a stable schema for pipelines: ``schema`` stays
``onnxlr.report/1`` while fields are only ever *added*; a key is never renamed,
removed or given another meaning. Values that were not measured are ``null``.

``onnxlr.report/1`` (JSON Schema: ``onnxlr/schemas/report.schema.json``, shipped in the
package; the tests validate real reports against it)::

    schema        "onnxlr.report/1"
    source        input path or null
    settings      {method, rank, rank_multiple, max_error, accept}
    summary       {layers_factorised, layers_pruned, layers_changed (= factorised + pruned),
                   layers_considered, params_before, params_after,
                   macs_before, macs_after, params_ratio, macs_ratio (after/before),
                   output_error, bound_met, accuracy_before, accuracy_after, seconds,
                   macs_reduction (before/after), speedup (measured end to end),
                   efficiency (speedup / macs_reduction), latency_before_ms, latency_after_ms}
    verification  null or {inputs, max_error, worst_rel_l2, passed,
                   outputs: [{name, rel_l2, max_abs, cosine, top1_agreement}]}
    latency       null or {provider, threads, batch, before_ms, after_ms, speedup,
                  speedup_p10, speedup_p90, speedup_ci_low, speedup_ci_high, ...} (end to
                  end, interleaved; the per-round speed-ups' spread and a 95% interval of
                  their median; extra keys pass through)
    profile       null or {layer: {before_ms, after_ms}} (ORT profiling inside the whole
                  model; "(other)" holds the ops outside every layer)
    budget        null or the budget's own dict (targets, achieved, which constraint bound)
    layers        [LayerRecord.to_dict() + {layer_speedup}]: name, op, kind, weight_shape,
                  method, rank_rule, ranks, kept_channels, params_*, macs_*, weight_error,
                  fit_error, output_error, status (factorised | pruned | declined |
                  reverted), reason, seconds,
                  latency_before_ms, latency_after_ms (the layer timed alone),
                  candidates [{ranks, macs, weight_error, local_error, latency_ms, chosen, ...}],
                  extra, layer_speedup

A factorised layer has ``ranks`` and ``weight_error``; a pruned one (channel pruning, thin
layers, a search's prune rung) has ``kept_channels`` and ``fit_error`` (its refit output's
error on the fitting samples) instead. Until ``layers_pruned`` was added, pruned layers were
written as ``factorised`` with their channel count in ``ranks``: ``layers_factorised`` counted
them, ``layers_changed`` is that count now.

MACs count the candidate layers only, so ``macs_reduction`` is the ideal speed-up of those
layers; ``efficiency`` = measured end-to-end speed-up ÷ that reduction: 1.0 means the FLOP
saving turned fully into time. Text, Markdown and HTML write every ratio one way
(:mod:`onnxlr.formats`); the module is over 400 lines by the narrow text table's dozen.
"""
from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass, field
from typing import Any

from onnxlr import escape, formats, text_table
from onnxlr.formats import describe_setup, fmt_value, human, ms_pair, ratio, size, speed
from onnxlr.records import LayerRecord

__all__ = ["Report", "SCHEMA", "describe_setup", "fmt_value", "human", "md_cell", "ms_pair",
           "printable"]

SCHEMA = "onnxlr.report/1"


def _version() -> str:
    from onnxlr import __version__
    return __version__


@dataclass
class Report:
    """What ``optimize`` did: settings, per-layer records, verification, totals."""

    source: str | None
    method: str
    rank: str
    rank_multiple: int
    max_error: float | None
    records: list[LayerRecord] = field(default_factory=list)
    comparison: Any = None            # runtime.Comparison, or None when not verified
    verify_inputs: str | None = None
    accuracy: tuple[float, float] | None = None   # (original, optimised) on labelled inputs
    seconds: float = 0.0
    accept: str = "error"             # "error" (bound only) or "latency" (also measured faster)
    # end-to-end latency, original vs result, measured side by side at the end:
    # {"provider", "threads", "batch", "before_ms", "after_ms", "speedup", "p10", "p90"}
    latency: dict | None = None
    # per-layer time inside the whole model from ORT profiling: {layer: {"before_ms", "after_ms"}}
    profile: dict | None = None
    # budgets (--target-speedup / --target-flops): targets, achieved values, which constraint bound
    budget: dict | None = None
    # the metric search (--metric / --max-drop): metric, scores before/after, drop and its
    # bound, inputs it was judged on, the path and its checks (onnxlr.search.run)
    search: dict | None = None
    calibrated: bool = False          # calibration data was given (provenance)
    # the input's big weights stayed in its data file (onnxlr.referenced): the result is
    # written with external data too
    weights_by_reference: bool = False

    # totals over candidate layers (MACs of other ops are not counted)
    @property
    def params_before(self) -> int:
        return sum(r.params_before for r in self.records)

    @property
    def params_after(self) -> int:
        return sum(r.params_after if r.changed else r.params_before
                   for r in self.records)

    @property
    def macs_before(self) -> int:
        return sum(r.macs_before for r in self.records)

    @property
    def macs_after(self) -> int:
        return sum(r.macs_after if r.changed else r.macs_before
                   for r in self.records)

    @property
    def factorised(self) -> list[LayerRecord]:
        return [r for r in self.records if r.factorised]

    @property
    def pruned(self) -> list[LayerRecord]:
        return [r for r in self.records if r.pruned]

    @property
    def changed(self) -> list[LayerRecord]:
        """The layers that are different in the result: factorised or pruned."""
        return [r for r in self.records if r.changed]

    @property
    def bound_met(self) -> bool | None:
        """True/False when a bound was checked, None when there was nothing to check."""
        if self.search is not None:
            return bool(self.search.get("met_bound"))
        if self.comparison is None or self.max_error is None:
            return None
        return bool(self.comparison)

    @property
    def output_error(self) -> float | None:
        return None if self.comparison is None else self.comparison.worst_rel_l2

    @property
    def macs_reduction(self) -> float | None:
        """Candidate-layer MACs before ÷ after (the ideal speed-up), None when nothing is left."""
        return self.macs_before / self.macs_after if self.macs_after else None

    @property
    def speedup(self) -> float | None:
        """End-to-end speed-up measured at the end (original vs result), if measured."""
        value = (self.latency or {}).get("speedup")
        return float(value) if isinstance(value, (int, float)) else None

    @property
    def efficiency(self) -> float | None:
        """Measured speed-up ÷ MAC reduction: how much of the FLOP saving became time."""
        if self.speedup is None or not self.macs_reduction:
            return None
        return self.speedup / self.macs_reduction

    def to_dict(self) -> dict:
        lat = self.latency or {}
        return {
            "schema": SCHEMA,
            "onnxlr_version": _version(),
            "source": self.source,
            "settings": {"method": self.method, "rank": self.rank,
                         "rank_multiple": self.rank_multiple, "max_error": self.max_error,
                         "accept": self.accept},
            "summary": {
                "layers_factorised": len(self.factorised),
                "layers_pruned": len(self.pruned),
                "layers_changed": len(self.changed),
                "layers_considered": len(self.records),
                "params_before": self.params_before, "params_after": self.params_after,
                "macs_before": self.macs_before, "macs_after": self.macs_after,
                "params_ratio": ratio(self.params_after, self.params_before),
                "macs_ratio": ratio(self.macs_after, self.macs_before),
                "output_error": self.output_error, "bound_met": self.bound_met,
                "accuracy_before": None if self.accuracy is None else self.accuracy[0],
                "accuracy_after": None if self.accuracy is None else self.accuracy[1],
                "seconds": round(self.seconds, 3),
                "macs_reduction": self.macs_reduction, "speedup": self.speedup,
                "efficiency": self.efficiency,
                "latency_before_ms": lat.get("before_ms"), "latency_after_ms": lat.get("after_ms"),
            },
            "verification": None if self.comparison is None else {
                "inputs": self.verify_inputs, **self.comparison.to_dict()},
            "latency": self.latency or None,
            "profile": self.profile or None,
            "budget": self.budget or None,
            "search": self.search or None,
            "layers": [{**r.to_dict(), "layer_speedup": r.layer_speedup} for r in self.records],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    @property
    def shown(self) -> list[LayerRecord]:
        """Records of candidate and quantized layers (activation MatMuls etc. are listed in
        JSON only)."""
        return [r for r in self.records if r.kind is not None or r.extra.get("quantized")]

    def _has_alone(self) -> bool:
        return any(r.latency_before_ms or r.latency_after_ms for r in self.shown)

    def _columns(self) -> list[str]:
        cols = ["layer", "op", "weight", "method", "rank", "params", "MACs", "w.err", "out.err"]
        if self._has_alone():
            cols.append("alone ms")
        if self.profile:
            cols.append("in-model ms")
        return cols + ["status"]

    def _rows(self) -> list[list[str]]:
        rows = []
        alone, profiled = self._has_alone(), bool(self.profile)
        for r in self.shown:
            row = [
                r.name, r.op, "x".join(map(str, r.weight_shape)) or "-", r.method or "-",
                formats.kept(r),
                f"{human(r.params_before)}→{human(r.params_after if r.changed else r.params_before)}",
                f"{human(r.macs_before)}→{human(r.macs_after if r.changed else r.macs_before)}",
                formats.layer_error(r),
                "-" if r.output_error is None else f"{r.output_error:.3g}",
            ]
            if alone:
                row.append(ms_pair(r.latency_before_ms, r.latency_after_ms))
            if profiled:
                p = self.profile.get(r.name) or {}
                row.append(ms_pair(p.get("before_ms"), p.get("after_ms")))
            row.append(r.status if r.changed else f"{r.status}: {r.reason}")
            rows.append(row)
        return rows

    def headline(self) -> str:
        """One line with the numbers a reader wants first (sizes after ÷ before, time as the
        speed-up; :mod:`onnxlr.formats`)."""
        parts = []
        if self.speedup is not None:
            parts.append(f"measured end to end: {speed(self.speedup, self.latency)}")
        s = self.search or {}
        scores = s.get("evaluation") or s
        if scores:
            where = "unseen inputs" if s.get("evaluation") else "held-out inputs"
            parts.append(f"{s['metric']} {scores['score_before']:.4f} → "
                         f"{scores['score_after']:.4f} on {where}")
        parts.append(size(self.macs_after, self.macs_before, "MACs"))
        parts.append(size(self.params_after, self.params_before, "params"))
        if self.efficiency is not None:
            parts.append(f"efficiency {self.efficiency:.2f}")
        if self.output_error is not None:
            bound = "" if self.max_error is None else (
                f" (bound {self.max_error:g} {'met' if self.bound_met else 'EXCEEDED'})")
            parts.append(f"output error {self.output_error:.3g}{bound}")
        return " · ".join(parts)

    def summary_lines(self) -> list[str]:
        lines = [
            f"layers changed: {len(self.changed)} of {len(self.shown)} candidates"
            f" ({len(self.factorised)} factorised, {len(self.pruned)} pruned)",
            f"params: {human(self.params_before)} → {human(self.params_after)} "
            f"({size(self.params_after, self.params_before, 'params', digits=3)})",
            f"MACs (candidate layers): {human(self.macs_before)} → {human(self.macs_after)} "
            f"({size(self.macs_after, self.macs_before, 'MACs', digits=3)})",
        ]
        if self.comparison is not None:
            lines.append(f"verified on {self.verify_inputs}")
            for o in self.comparison.outputs:
                top1 = "" if o.top1_agreement is None else f", top-1 agreement {o.top1_agreement:.3f}"
                lines.append(f"output '{o.name}': rel. L2 error {o.rel_l2:.4g}, max abs "
                             f"{o.max_abs:.4g}, cosine {o.cosine:.5f}{top1}")
            if self.accuracy is not None:
                lines.append(f"accuracy on the labelled inputs: {self.accuracy[0]:.4f} → "
                             f"{self.accuracy[1]:.4f}")
            if self.max_error is not None:
                lines.append(f"bound --max-error {self.max_error:g}: "
                             f"{'met' if self.bound_met else 'EXCEEDED'}")
        else:
            lines.append("not verified with ONNX Runtime")
        if self.accept == "latency":
            lines.append("accept latency: a layer is kept only if measured faster on its own")
        lines += self._search_lines()
        lines += self._latency_lines() + self._profile_lines() + self._budget_lines()
        return lines

    def _search_lines(self) -> list[str]:
        s = self.search
        if not s:
            return []
        lines = [f"metric {s['metric']} ({s['metric_description']}): {s['score_before']:.4f} → "
                 f"{s['score_after']:.4f}, drop {formats.drop(s['drop'])}"
                 + (f", {100 * s['confidence']:.0f}% bound {formats.drop(s['drop_bound'])}"
                    if s.get("drop_bound") is not None and s.get("confidence") else "")
                 + f" (allowed {s['max_drop']:g}: {'met' if s.get('met_bound') else 'EXCEEDED'})"]
        ev = s.get("evaluation")
        if ev:
            lines.append(f"metric {s['metric']} on {ev['inputs']}: {ev['score_before']:.4f} → "
                         f"{ev['score_after']:.4f} (drop {formats.drop(ev['drop'])})")
        if s.get("synthetic_inputs"):
            lines.append("WARNING: judged on SYNTHETIC random inputs, not real data: give --calib "
                         "or --inputs; the result may not hold on real inputs")
        predicted = s.get("predicted_speedup")
        lines.append(f"search: {s['layers_with_ladders']} layers, {s['rungs']} candidates "
                     f"measured alone, {s['path_steps']} path steps, {len(s['checks'])} "
                     f"end-to-end checks, {s['gated_runs']} runs of one gated session; "
                     "predicted " + (speed(predicted) if isinstance(predicted, (int, float))
                                     else "-"))
        if s.get("target_met") is not None:
            lines.append(f"target {'met' if s['target_met'] else 'MISSED'}")
        return lines

    def _latency_lines(self) -> list[str]:
        lat = self.latency
        if not lat or lat.get("before_ms") is None:
            return []
        line = (f"end to end ({describe_setup(lat)}): {lat['before_ms']:.3f} → "
                f"{lat['after_ms']:.3f} ms, {speed(self.speedup, lat)}")
        spread = formats.noise(lat)
        if spread is not None:
            rounds = f" over {lat['iterations']} interleaved rounds" if lat.get("iterations") else ""
            line += f", per-round p10–p90 {spread[0]:.2f}–{spread[1]:.2f}x{rounds}"
        elif lat.get("p10_after_ms") is not None and lat.get("p90_after_ms") is not None:
            line += (f" (p10–p90 {lat.get('p10_before_ms', 0):.3f}–"
                     f"{lat.get('p90_before_ms', 0):.3f} → {lat['p10_after_ms']:.3f}–"
                     f"{lat['p90_after_ms']:.3f} ms)")
        if self.macs_reduction is not None:
            line += (f"; {size(self.macs_after, self.macs_before, 'MACs')} would ideally be "
                     f"{speed(self.macs_reduction)}")
        if self.efficiency is not None:
            line += f": efficiency {self.efficiency:.2f}"
        lines = [line]
        if lat.get("returned") == "input":
            rejected = lat.get("rejected_speedup")
            lines.append("the result was not faster"
                         + (f" ({speed(rejected)})" if isinstance(rejected, (int, float)) else "")
                         + ": the input model was returned unchanged")
        return lines

    def _profile_lines(self) -> list[str]:
        if not self.profile:
            return []
        names = {r.name for r in self.changed}
        mine = [v for k, v in self.profile.items() if k in names]
        before = sum(v.get("before_ms") or 0 for v in mine)
        after = sum(v.get("after_ms") or 0 for v in mine)
        total_b = sum(v.get("before_ms") or 0 for v in self.profile.values())
        total_a = sum(v.get("after_ms") or 0 for v in self.profile.values())
        line = (f"profiled inside the model: changed layers {before:.3f} → {after:.3f} ms"
                f" of {total_b:.3f} → {total_a:.3f} ms in all kernels")
        return [line]

    def _budget_lines(self) -> list[str]:
        if not self.budget:
            return []
        items = ", ".join(f"{k} {fmt_value(v)}" for k, v in self.budget.items())
        return [f"budget: {items}"]

    def to_text(self, width: int | None = None) -> str:
        """The layer table and the summary. With ``width`` (the terminal's columns), no line
        is longer: a table too wide for it becomes one block per layer (the name and status,
        then its numbers, then the reason, wrapped), and the summary wraps; nothing is cut."""
        header = self._columns()
        rows = [[printable(c) for c in row] for row in self._rows()]
        table = text_table.table(header, rows, [(printable(r.status), printable(r.reason or ""))
                                                for r in self.shown], width)
        if any(h.endswith(" ms") for h in header):
            table.append("(ms: before→after, and how many times faster)")
        summary = [printable(s) for s in self.summary_lines() + ["result: " + self.headline()]]
        if width is not None:
            summary = [part for line in summary
                       for part in textwrap.wrap(line, max(width, 40), subsequent_indent="  ",
                                                 break_on_hyphens=False) or [""]]
        return "\n".join(table + [""] + summary)

    def to_html(self) -> str:
        """Self-contained HTML page with charts (:mod:`onnxlr.html_report`)."""
        from onnxlr.html_report import render_html  # it imports this module
        return render_html(self)

    def to_markdown(self) -> str:
        header = self._columns()
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in self._rows()]
        return "\n".join(["### onnxlr report", "", f"**{md_cell(self.headline())}**", ""]
                         + lines + [""]
                         + [f"- {md_cell(s)}" for s in self.summary_lines()]) + "\n"


#: Model text in a terminal line / a Markdown cell: see :mod:`onnxlr.escape`.
printable = escape.text
md_cell = escape.markdown
