"""Global budgets: spend a FLOP or speed-up target where it costs the least accuracy.

For ``--target-flops F`` (MACs of the candidate layers ≤ F × before) or
``--target-speedup S`` (whole model S× faster), every candidate layer gets a
ladder of options — its ranks at 1/2, 1/4, 1/8 (…) of its MACs, rounded to a
multiple of 8 where the layer is big enough (PITFALLS 7) — and each option is
built and measured alone on the layer's real input (``onnxlr.latency``): its
MACs, its own output error, its latency. Then, in the spirit of AIMET's greedy
compression-ratio selection, layers move down their ladders one step at a time,
always taking the step that adds the least squared output error per unit saved
(MACs, or measured milliseconds for a speed target), until the target is met.
The whole model is then verified end to end; if ``--max-error`` is missed the
usual back-off grows the worst layers' ranks, and the report says which
constraint bound: the target, the error bound, or neither (target unreachable).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from onnxlr.errors import OnnxlrError
from onnxlr.latency import LayerTimer, Trial, layer_nodes_and_inputs
from onnxlr.methods import METHODS
from onnxlr.graph import to_graph
from onnxlr.records import Declined, LayerRecord
from onnxlr.sites import find_site

logger = logging.getLogger(__name__)

#: MAC fractions offered to every layer (its ladder), cheapest last.
LEVELS = (0.5, 0.25, 0.125, 0.0625)


def ranks_for_macs(method, site, fraction: float, multiple: int) -> tuple[int, ...] | None:
    """The largest ranks (a uniform fraction of full ranks, rounded to ``multiple`` where a
    mode is at least 4× that) whose MACs are at most ``fraction`` of the layer's."""
    full = method.full_ranks(site)
    if method.name == "cp":  # one rank, unbounded by the channel dims: bisect it directly
        full = (min(full[0], max(site.weight.shape[:2]) * 4),)

    def ranks(g: float) -> tuple[int, ...]:
        out = []
        for f in full:
            r = max(1, math.floor(g * f))
            if f >= 4 * multiple and r >= multiple:
                r = r // multiple * multiple
            out.append(min(r, f))
        return tuple(out)

    budget = fraction * site.macs
    lo, hi, best = 0.0, 1.0, None
    for _ in range(30):
        g = (lo + hi) / 2
        cand = ranks(g)
        if method.cost(site, cand)[1] <= budget:
            best, lo = cand, g
        else:
            hi = g
    return best


@dataclass
class Ladder:
    """One layer's options, most expensive first; index -1 means "left as it is"."""

    name: str
    options: list[Trial]
    macs_before: int
    ms_before: float | None

    def saving(self, i: int, by: str) -> float:
        if i < 0:
            return 0.0
        t = self.options[i]
        return float(self.macs_before - t.macs) if by == "macs" else (t.ms_before - t.ms_after)

    def error2(self, i: int) -> float:
        return 0.0 if i < 0 else float(self.options[i].local_error or 0.0) ** 2


def build_ladders(build, feeds, records: list[LayerRecord], timer: LayerTimer,
                  multiple: int, levels=LEVELS, progress=None) -> list[Ladder]:
    """Measure every selected layer at each level of its ladder (options that save nothing,
    or for a speed target are not faster, are dropped)."""
    graph, nodes, values = layer_nodes_and_inputs(
        build.prepared, [r.name for r in records if r.method], feeds, provider=timer.provider)
    todo = [r for r in records if r.method and r.name in nodes]
    ladders = []
    for i, rec in enumerate(todo):
        if progress:
            progress(i, len(todo), f"budget: measuring {rec.name}")
        node = nodes[rec.name]
        site = find_site(node, graph)
        method = METHODS[rec.method]()
        cands = [ranks_for_macs(method, site, f, multiple) for f in levels]
        cands = [c for c in dict.fromkeys(cands) if c is not None]
        trials = [t for t in timer.trials(node, values, rec.method, cands) if t.speedup]
        if trials:
            ladders.append(Ladder(rec.name, trials, rec.macs_before, trials[0].ms_before))
    timer.timing_cache.save()
    return ladders


def allocate(ladders: list[Ladder], *, by: str, need: float) -> tuple[dict[str, int], float]:
    """Greedy: take the step (any layer to any cheaper option) with the least added squared
    error per unit saved until the savings reach ``need``; returns {layer: option index}
    and the saving reached. Options that save nothing (or time) are never taken."""
    state = {lad.name: -1 for lad in ladders}
    saved = 0.0
    while saved < need:
        best = None
        for lad in ladders:
            cur = state[lad.name]
            for j in range(cur + 1, len(lad.options)):
                gain = lad.saving(j, by) - lad.saving(cur, by)
                if gain <= 0:
                    continue
                cost = max(lad.error2(j) - lad.error2(cur), 0.0) / gain
                if best is None or cost < best[0]:
                    best = (cost, lad.name, j, gain)
        if best is None:
            break  # every layer is at its cheapest useful option: the target is out of reach
        _, name, j, gain = best
        state[name] = j
        saved += gain
    return state, saved


def plan(ladders: list[Ladder], *, target_flops: float | None, target_speedup: float | None,
         macs_total: int, model_ms: float | None) -> tuple[dict[str, tuple[int, ...]], dict]:
    """Ranks per layer for the target, and the budget's account (predicted values)."""
    if target_flops is not None:
        if not 0 < target_flops < 1:
            raise OnnxlrError(f"invalid --target-flops {target_flops}: must be in (0, 1)")
        by, need = "macs", (1 - target_flops) * macs_total
    else:
        if not target_speedup > 1:
            raise OnnxlrError(f"invalid --target-speedup {target_speedup}: must be > 1")
        by, need = "ms", model_ms * (1 - 1 / target_speedup)
    state, saved = allocate(ladders, by=by, need=need)
    ranks = {lad.name: lad.options[state[lad.name]].ranks
             for lad in ladders if state[lad.name] >= 0}
    account = {"target_flops": target_flops, "target_speedup": target_speedup,
               "by": by, "needed": need, "planned_saving": saved,
               "reachable": saved >= need,
               "predicted_error_sum_sq": sum(lad.error2(state[lad.name]) for lad in ladders)}
    if by == "macs":
        account["predicted_macs_ratio"] = 1 - saved / macs_total if macs_total else 1.0
    else:
        account["predicted_speedup"] = model_ms / max(model_ms - saved, 1e-9)
    return ranks, account


def selected_layers(build) -> list[LayerRecord]:
    """A record (name, op, kind, method, MACs) for every layer the settings select."""
    from onnxlr.passes.factorize import CANDIDATE_OPS

    config = build.config
    out = []
    graph = to_graph(build.prepared)
    for node in graph.nodes:
        if node.op not in CANDIDATE_OPS or node.domain:
            continue
        site = find_site(node, graph)
        if isinstance(site, Declined) or config.selected(node.name):
            continue
        method = config.methods.get(site.kind)
        if method:
            out.append(LayerRecord(name=node.name, op=node.op, kind=site.kind, method=method,
                                   macs_before=site.macs, params_before=site.params))
    return out
