"""``onnxlr inspect``: what each rank rule would do to each candidate layer, without changing it.

Fast by design: no onnxruntime, no decomposition — only spectra (SVDs of the
weight and its unfoldings) and cost formulas.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from onnxlr import escape
from onnxlr.errors import OnnxlrError
from onnxlr.graph import to_graph
from onnxlr.methods import METHODS, parse_method
from onnxlr.passes.prepare import prepare
from onnxlr.rank import parse_rank
from onnxlr.report import human
from onnxlr.records import Declined
from onnxlr.sites import LAYER_OPS, QUANTIZED_OPS, find_site, nested_layer_records

RULES = ("vbmf", "energy:0.95", "0.25")


@dataclass
class LayerView:
    name: str
    op: str
    kind: str | None
    weight_shape: tuple
    params: int = 0
    macs: int = 0
    method: str | None = None
    choices: dict = field(default_factory=dict)   # rule → (ranks, macs ratio) or a Declined
    reason: str = ""


def inspect_model(model: onnx.ModelProto, method: str = "auto", rules=RULES,
                  rank_multiple: int = 1) -> list[LayerView]:
    """One :class:`LayerView` per Gemm/MatMul/Conv node of the prepared model."""
    from onnxlr.methods import CHANNEL_METHODS
    if method.strip() in CHANNEL_METHODS:
        raise OnnxlrError(f"inspect lists factorisation ranks; --method {method.strip()} has none "
                          f"(run optimize: its report lists the removed channels per layer)")
    plan = parse_method(method)
    selectors = [parse_rank(r) for r in rules]
    views = []
    graph = to_graph(prepare(model))
    for node in graph.nodes:
        if node.op not in LAYER_OPS + QUANTIZED_OPS or node.domain:
            continue
        site = find_site(node, graph)
        if isinstance(site, Declined):
            views.append(LayerView(node.name, node.op, None, (), reason=site.reason))
            continue
        view = LayerView(node.name, node.op, site.kind, tuple(site.weight.shape), site.params,
                         site.macs, plan.get(site.kind))
        views.append(view)
        if view.method is None:
            view.reason = f"no method selected for {site.kind} layers"
            continue
        view.reason = METHODS[view.method].too_big(site) or ""
        if view.reason:  # even its spectrum would cost more than a layer is allowed
            continue
        m = METHODS[view.method]()
        for sel in selectors:
            ranks = m.choose_ranks(site, sel, rank_multiple)
            if isinstance(ranks, Declined):
                view.choices[sel.spec] = ranks
                continue
            params, macs = m.cost(site, ranks)
            if params >= site.params or macs >= site.macs:
                view.choices[sel.spec] = Declined(f"ranks {ranks} save nothing")
            else:
                view.choices[sel.spec] = (tuple(ranks), macs / site.macs)
    views += [LayerView(r.name, r.op, r.kind, r.weight_shape, r.params_before, r.macs_before,
                        reason=r.reason) for r in nested_layer_records(graph)]
    return views


def format_views(views: list[LayerView], rules=RULES) -> str:
    total = sum(v.macs for v in views) or 1
    header = ["layer", "op", "weight", "params", "MACs", "share", "method"] + list(rules)
    rows = [header]
    for v in views:
        row = [v.name, v.op, "x".join(map(str, v.weight_shape)) or "-", human(v.params),
               human(v.macs), f"{100 * v.macs / total:.1f}%", v.method or "-"]
        for r in rules:
            c = v.choices.get(r)
            if c is None:
                row.append(v.reason or "-")
            elif isinstance(c, Declined):
                row.append("declined: " + c.reason)
            else:
                row.append(f"{'x'.join(map(str, c[0]))} ({c[1]:.2f}x MACs)")
        rows.append(row)
    rows = [[escape.text(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
