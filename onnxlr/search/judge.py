"""Building one assignment as a model, refitting it sequentially and judging it.

The search's planner picks assignments ({layer: rung}) on the gated graph; what is finally
returned is built here as a plain model (:func:`build_assignment`: the factorisations, then
the chosen channel chains), refit in topological order on the compressed prefix when there
are fitting samples (:mod:`onnxlr.search.refit`), and scored on the held-out inputs with the
drop's bound (:class:`Judge`). The records say what each layer became and why.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import onnx

from onnxlr import runtime
from onnxlr.graph import to_graph, to_model
from onnxlr.passes.factorize import Factorize
from onnxlr.passes.lstm_units import HiddenFit
from onnxlr.records import FACTORISED, PRUNED
from onnxlr.search.metrics import drop_bound, input_samples
from onnxlr.search import hidden_pruning
from onnxlr.search.pruning import PRUNE, layer_costs
from onnxlr.search.pruning import apply as apply_pruning
from onnxlr.sites import MATRIX_KINDS

#: The refit's further bisection stops once it has taken this long (each check is a build,
#: a refit of every changed layer and a run; on a 60-layer detector, ~20 s each).
REFIT_SECONDS = 40.0


@dataclass
class Built:
    assignment: dict
    model: onnx.ModelProto
    records: list
    outputs: dict
    score: float
    distortion: float
    bound: float    # the drop's bound (metrics.drop_bound): what max_drop is compared with
    refit: dict = field(default_factory=dict)


class Judge:
    """Builds an assignment, refits it sequentially (when fitting samples exist) and scores
    it on the held-out inputs: the refit is kept when the metric holds its bound and the
    output error is lower (a metric over a few hundred samples is too coarse to tell)."""

    def __init__(self, build, ladders, empty, allowed, metric, reference, labels, verifier,
                 fit_batches, fits=None):
        self.build, self.ladders, self.empty, self.allowed = build, ladders, empty, allowed
        self.fits = fits or {}
        self.progress = None
        self.metric, self.reference, self.labels = metric, reference, labels
        self.verifier, self.fit_batches = verifier, fit_batches
        self.baseline = metric.score(reference, reference, labels)
        self.refit_checks = 0

    def _score(self, model):
        """(outputs, score, output error, drop bound) of a model on the held-out inputs."""
        out = runtime.run(session_for(model, self.verifier.provider), self.verifier.feeds)
        score = self.metric.score(self.reference, out, self.labels)
        bound = drop_bound(self.metric, self.reference, out, self.labels,
                           drop=self.baseline - score, stop_above=self.allowed,
                           samples=input_samples(self.verifier.feeds))
        return out, score, runtime.compare_outputs(self.reference, out).worst_rel_l2, bound

    def __call__(self, assignment: dict, refit: bool = True,
                 reasons: dict[str, str] | None = None) -> Built:
        """``reasons``: why a layer on a ladder is left out, where not the default's."""
        model, records = build_assignment(self.build, self.ladders, self.empty, assignment,
                                          self.allowed, self.fits, reasons)
        out, score, dist, bound = self._score(model)
        plain = Built(dict(assignment), model, records, out, score, dist, bound)
        if not (refit and self.fit_batches and assignment):
            return plain
        from onnxlr.search.refit import refit_sequentially
        self.refit_checks += 1
        if self.progress:
            self.progress(self.refit_checks - 1, self.refit_checks, "refit on the compressed "
                          f"model ({len(assignment)} layers)")
        pruned = {k for k, j in assignment.items() if _rung(self.ladders, k, j).scope == "chain"}
        refitted, done = refit_sequentially(self.build.prepared, model, list(assignment),
                                            self.fit_batches, provider=self.verifier.provider,
                                            pruned=pruned)
        out2, score2, dist2, bound2 = self._score(refitted)
        info = {"layers": len(done), "score_without": score, "score_with": score2,
                "output_error_without": dist, "output_error_with": dist2,
                "layer_errors": {r.layer: [r.before, r.after] for r in done}}
        ok = bound2 <= self.allowed + 1e-12
        if ok and (dist2 < dist or score2 > score):
            for rec in records:
                if rec.name in info["layer_errors"]:
                    rec.extra["refit_layer_error"] = info["layer_errors"][rec.name]
            return Built(dict(assignment), refitted, records, out2, score2, dist2, bound2,
                          {**info, "kept": True})
        plain.refit = {**info, "kept": False}
        return plain

    def feasible(self, built: Built) -> bool:
        return built.bound <= self.allowed + 1e-12

    def extend(self, steps, t: int, best: Built, *, target: bool) -> Built:
        """With the refit, the longest path prefix beyond ``t`` that holds the bound (by
        bisection, each check one build + refit), if it saves more than ``best``."""
        if not target or t >= len(steps) or not self.feasible(best):
            return best
        lo, hi, found = t, len(steps) + 1, None
        start = time.perf_counter()
        while hi - lo > 1 and time.perf_counter() - start < REFIT_SECONDS:
            mid = (lo + hi) // 2
            trial = self(steps[mid - 1].as_dict())
            if self.feasible(trial) and trial.refit.get("kept", True):
                lo, found = mid, trial
            else:
                hi = mid
        if found is not None and _saved(self.ladders, found.assignment) > \
                _saved(self.ladders, best.assignment):
            return found
        return best


def _saved(ladders, assignment) -> float:
    from onnxlr.search.planner import predicted
    return predicted(ladders, assignment)[0]


def _rung(ladders, layer, j):
    return next(lad for lad in ladders if lad.layer == layer).rungs[j]


def session_for(model, provider):
    from onnxlr.verify import session
    return session(model, provider)


def build_assignment(build, ladders, empty, assignment, allowed, fits=None, reasons=None):
    """The model with the chosen rungs, every other selected layer kept (with why:
    ``reasons`` where given)."""
    by = {lad.layer: lad for lad in ladders}
    pruned = {k: j for k, j in assignment.items() if by[k].rungs[j].option.method == PRUNE}
    lowrank = {k: j for k, j in assignment.items() if k not in pruned}
    forced = {k: by[k].rungs[j].option.ranks for k, j in lowrank.items()}
    methods = {k: by[k].rungs[j].option.method for k, j in lowrank.items()}
    keep = {name: f"search: {why}" for name, why in empty.items()}
    keep.update({k: "search: pruned" for k in pruned})
    for lad in ladders:
        if lad.layer not in assignment:
            best = min(lad.rungs, key=lambda r: max(r.drop or 0.0, 0.0))
            keep[lad.layer] = (f"search: not needed or not affordable: its best rung alone "
                               f"drops the metric by {best.drop:.4g} (allowed {allowed:g} for "
                               f"the whole model) for {best.speedup:.2f}x on the layer")
    keep.update({k: f"search: {why}" for k, why in (reasons or {}).items()})
    config = dataclasses.replace(build.config, forced_ranks=forced, forced_methods=methods,
                                 rank_scale={})
    graph = to_graph(build.prepared)
    result = Factorize(config, keep, build.cache)(graph)
    records = result.records
    if pruned:
        _prune(graph, records, {k: fits[(k, by[k].rungs[j].option.ranks[0])]
                                for k, j in pruned.items()})
    for rec in records:
        lad = by.get(rec.name)
        if lad is None:
            continue
        j = assignment.get(rec.name, -1)
        rec.candidates = [r.to_dict(i == j) for i, r in enumerate(lad.rungs)]
        rec.extra["ladder_dropped"] = lad.dropped
        per_sample = _per_sample(lad, rec)
        if "macs_note" in rec.extra and per_sample:
            # the graph's count is per position where a dim is symbolic (a sequence, a
            # recurrent time axis): count on the layer's captured input instead, per sample
            rec.macs_before = rec.macs_after = per_sample(lad.macs_before)
            rec.extra["macs_note"] = "MACs per sample, counted on the captured input's shape"
        if j >= 0 and rec.changed:
            rung = lad.rungs[j]
            rec.latency_before_ms, rec.latency_after_ms = rung.ms_before, rung.ms_after
            rec.rank_rule = "searched"
            if per_sample and "captured" in rec.extra.get("macs_note", ""):
                rec.macs_after = per_sample(rung.macs)
            rec.output_error = rung.distortion
            rec.extra.update(local_error=rung.local_error, metric_drop_alone=rung.drop)
    return to_model(graph, build.prepared), records


def _prune(graph, records, chosen: dict) -> None:
    """Rewrite the chosen channel chains; the records say what changed, a producer's saving
    counted in its consumer's record (as :mod:`onnxlr.passes.prune` does)."""
    by = {r.name: r for r in records}
    hidden = {k: f for k, f in chosen.items() if isinstance(f, HiddenFit)}
    failed = apply_pruning(graph, {k: f for k, f in chosen.items() if k not in hidden})
    failed.update(hidden_pruning.apply(graph, hidden) if hidden else {})
    for layer, fitted in chosen.items():
        rec = by.get(layer)
        if rec is None:
            continue
        if layer in failed:
            rec.reason = f"search: the chosen pruning no longer applies ({failed[layer]})"
            continue
        rec.status, rec.reason, rec.method = PRUNED, "", PRUNE
        rec.ranks, rec.weight_error = None, None
        rec.kept_channels, rec.fit_error = fitted.kept_count, fitted.error
        rec.extra.update(removed_channels=fitted.channels - fitted.kept_count,
                         **({"consumer": fitted.neighbour} if layer in hidden
                            else {"producer": fitted.neighbour}))
    costs = layer_costs(graph)
    producers = {f.neighbour for k, f in chosen.items() if k not in failed}
    for rec in records:
        cost = costs.get(rec.name)
        if cost is None and rec.status == FACTORISED and rec.name in producers:
            # a factorised layer's nodes are named under it ("<layer>/tucker/conv_out", …):
            # its cost now, after a pruned consumer took rows off its last stage
            parts = [c for name, c in costs.items() if name.startswith(rec.name + "/")]
            cost = (sum(p for p, _ in parts), sum(m for _, m in parts)) if parts else None
        if cost is None or cost == (rec.params_after, rec.macs_after):
            continue
        if rec.changed:
            rec.params_after, rec.macs_after = cost
            continue
        driver = next((by[k] for k, f in chosen.items()
                       if k in by and k not in failed and f.neighbour == rec.name), None)
        if driver is None:
            continue
        driver.params_before += rec.params_before - cost[0]
        driver.macs_before += rec.macs_before - cost[1]
        driver.extra.setdefault("neighbour_saving", {})[rec.name] = {
            "params": rec.params_before - cost[0], "macs": rec.macs_before - cost[1]}
        rec.params_before, rec.macs_before = cost
        rec.params_after, rec.macs_after = cost
        rec.extra["changed_by"] = driver.name


def _per_sample(lad, rec):
    """MACs on the captured input → per sample: a conv's count leaves the batch out already,
    a matrix product's counts every row, the batch's included."""
    if not lad.macs_before or not lad.samples:
        return None
    if rec.kind in MATRIX_KINDS:
        return lambda macs: int(round(macs / lad.samples))
    return lambda macs: int(macs)
