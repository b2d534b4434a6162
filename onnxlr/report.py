"""The report: built from the per-layer records alone, rendered as text, JSON or Markdown.

The JSON form has a stable schema (``schema`` field) for pipelines; the text
table is what the CLI prints; Markdown suits a pull-request comment.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from onnxlr.records import FACTORISED, LayerRecord

SCHEMA = "onnxlr.report/1"


def human(n: float) -> str:
    """1234567 → '1.23M' (params, MACs)."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def _ratio(after: float, before: float) -> float:
    return after / before if before else 1.0


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

    # totals over candidate layers (MACs of other ops are not counted)
    @property
    def params_before(self) -> int:
        return sum(r.params_before for r in self.records)

    @property
    def params_after(self) -> int:
        return sum(r.params_after if r.status == FACTORISED else r.params_before
                   for r in self.records)

    @property
    def macs_before(self) -> int:
        return sum(r.macs_before for r in self.records)

    @property
    def macs_after(self) -> int:
        return sum(r.macs_after if r.status == FACTORISED else r.macs_before
                   for r in self.records)

    @property
    def factorised(self) -> list[LayerRecord]:
        return [r for r in self.records if r.status == FACTORISED]

    @property
    def bound_met(self) -> bool | None:
        """True/False when a bound was checked, None when there was nothing to check."""
        if self.comparison is None or self.max_error is None:
            return None
        return bool(self.comparison)

    @property
    def output_error(self) -> float | None:
        return None if self.comparison is None else self.comparison.worst_rel_l2

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "source": self.source,
            "settings": {"method": self.method, "rank": self.rank,
                         "rank_multiple": self.rank_multiple, "max_error": self.max_error},
            "summary": {
                "layers_factorised": len(self.factorised),
                "layers_considered": len(self.records),
                "params_before": self.params_before, "params_after": self.params_after,
                "macs_before": self.macs_before, "macs_after": self.macs_after,
                "params_ratio": _ratio(self.params_after, self.params_before),
                "macs_ratio": _ratio(self.macs_after, self.macs_before),
                "output_error": self.output_error, "bound_met": self.bound_met,
                "accuracy_before": None if self.accuracy is None else self.accuracy[0],
                "accuracy_after": None if self.accuracy is None else self.accuracy[1],
                "seconds": round(self.seconds, 3),
            },
            "verification": None if self.comparison is None else {
                "inputs": self.verify_inputs, **self.comparison.to_dict()},
            "layers": [r.to_dict() for r in self.records],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def _rows(self) -> list[list[str]]:
        rows = []
        for r in self.records:
            if r.kind is None:
                continue  # not a candidate at all (e.g. activation MatMul): listed in JSON only
            rows.append([
                r.name, r.op, "x".join(map(str, r.weight_shape)), r.method or "-",
                "x".join(map(str, r.ranks)) if r.ranks and r.weight_error is not None else "-",
                f"{human(r.params_before)}→{human(r.params_after if r.factorised else r.params_before)}",
                f"{human(r.macs_before)}→{human(r.macs_after if r.factorised else r.macs_before)}",
                "-" if r.weight_error is None else f"{r.weight_error:.3f}",
                "-" if r.output_error is None else f"{r.output_error:.3g}",
                r.status if r.status == FACTORISED else f"{r.status}: {r.reason}",
            ])
        return rows

    HEADER = ["layer", "op", "weight", "method", "rank", "params", "MACs", "w.err", "out.err",
              "status"]

    def summary_lines(self) -> list[str]:
        lines = [
            f"layers factorised: {len(self.factorised)} of "
            f"{sum(1 for r in self.records if r.kind)} candidates",
            f"params: {human(self.params_before)} → {human(self.params_after)} "
            f"({_ratio(self.params_after, self.params_before):.3f}x)",
            f"MACs (candidate layers): {human(self.macs_before)} → {human(self.macs_after)} "
            f"({_ratio(self.macs_after, self.macs_before):.3f}x)",
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
        return lines

    def to_text(self) -> str:
        rows = [self.HEADER] + self._rows()
        widths = [max(len(row[i]) for row in rows) for i in range(len(self.HEADER) - 1)]
        out = []
        for row in rows:
            out.append("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
        return "\n".join(out + [""] + self.summary_lines())

    def to_markdown(self) -> str:
        def cell(c: str) -> str:
            return c.replace("|", "\\|").replace("\n", " ")
        lines = ["| " + " | ".join(self.HEADER) + " |", "|" + "---|" * len(self.HEADER)]
        lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in self._rows()]
        return "\n".join(["### onnxlr report", ""] + lines + [""]
                         + [f"- {cell(s)}" for s in self.summary_lines()]) + "\n"
