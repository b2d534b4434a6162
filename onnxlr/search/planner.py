"""The global search: fastest model within the metric's allowed drop, in few model runs.

1. ladders (``onnxlr.search.ladders``): every layer's rungs, each measured faster alone;
2. sensitivity: the metric's drop with each rung alone in place, scored on the gated graph
   (one ORT session for every trial, ``onnxlr.search.gated``);
3. a greedy path: starting from the original, each step moves one layer one or more rungs
   down, always the step with the least added damage per millisecond saved (a multiple-
   choice knapsack solved greedily, as AIMET's greedy ratio selection does);
4. the end-to-end check: bisect the path for the longest prefix whose *real* metric drop,
   all layers together, is within ``max_drop`` (O(log steps) gated runs), then try a few of
   the later steps one by one (a step that broke the bound need not stop the ones after it);
5. for ``target_speedup`` / ``target_flops`` the shortest prefix that meets the target is
   taken instead, if it is within the bound.

Damage is the measured metric drop; a granular metric (top-1 over a few hundred samples)
ties at zero for most rungs, so the rung's output error, scaled to a tenth of the allowance,
breaks ties.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np

from onnxlr import runtime
from onnxlr.search.ladders import Ladder
from onnxlr.search.metrics import CONFIDENCE, Metric, drop_bound, input_samples

logger = logging.getLogger(__name__)

#: The output error's weight in a rung's damage, as a fraction of the allowed drop.
TIE_BREAK = 0.1
#: Later path steps tried one by one after the bisection.
REPAIR_CHECKS = 12
#: ... each judged at this confidence (Bonferroni over those tries): each is a fresh chance
#: to pass by luck, and at the bisection's 80% one of twelve assignments whose true drop is
#: at the bound passes with probability 1 - 0.8^12 = 93%. On ddddocr, judged by exact match
#: against its labels, the tries kept lucky gains (-2.3 points on the held-out captchas)
#: that lost 2.4 points on the test ones.
REPAIR_CONFIDENCE = 1.0 - (1.0 - CONFIDENCE) / REPAIR_CHECKS


@dataclass(frozen=True)
class Step:
    """The assignment after one step of the path, and what the step predicts."""

    assignment: tuple[tuple[str, int], ...]   # (layer, rung index) for every changed layer
    layer: str
    rung: int
    saved_ms: float
    macs_saved: int

    def as_dict(self) -> dict[str, int]:
        return dict(self.assignment)


def damage(rung, max_drop: float) -> float:
    drop = max(rung.drop or 0.0, 0.0)
    err = rung.distortion if rung.distortion is not None and math.isfinite(rung.distortion) else 1e3
    return drop + TIE_BREAK * max(max_drop, 1e-6) * err


def greedy_path(ladders: list[Ladder], max_drop: float) -> list[Step]:
    """The order in which layers move down their ladders, cheapest damage per ms first.

    Any combination of rungs can be built as the gated graph scored it: a prune rung's
    ``Gather`` of its producer's output is the same model whether that producer is the
    original layer or a factorised one (whose last stage then loses those rows), and pruning
    a layer's inputs and its outputs composes. (A rule that kept a pruned layer's producer
    from any low-rank rung locked the digits CNN's fastest rungs, 2.7x on two convs, out.)"""
    state = {lad.layer: -1 for lad in ladders}
    saved = {lad.layer: 0.0 for lad in ladders}
    macs = {lad.layer: 0 for lad in ladders}
    steps: list[Step] = []
    while True:
        best = None
        for lad in ladders:
            cur = state[lad.layer]
            cur_damage = 0.0 if cur < 0 else damage(lad.rungs[cur], max_drop)
            for j in range(cur + 1, len(lad.rungs)):
                gain = lad.rungs[j].saved_ms(lad.ms_before) - saved[lad.layer]
                if gain <= 0:
                    continue
                cost = max(damage(lad.rungs[j], max_drop) - cur_damage, 0.0) / gain
                if best is None or cost < best[0]:
                    best = (cost, lad, j)
        if best is None:
            return steps
        _, lad, j = best
        state[lad.layer] = j
        saved[lad.layer] = lad.rungs[j].saved_ms(lad.ms_before)
        macs[lad.layer] = lad.rungs[j].macs_saved(lad.macs_before)
        steps.append(Step(tuple((k, v) for k, v in state.items() if v >= 0), lad.layer, j,
                          sum(saved.values()), sum(macs.values())))


def subset(feeds: dict[str, np.ndarray], labels, n: int):
    """The first ``n`` samples of every input (and label), when they share a batch dim."""
    sizes = {v.shape[0] for v in feeds.values() if getattr(v, "ndim", 0) >= 1}
    if len(sizes) != 1 or next(iter(sizes)) <= n:
        return feeds, labels
    cut = {k: (v[:n] if getattr(v, "ndim", 0) >= 1 else v) for k, v in feeds.items()}
    return cut, (labels[:n] if labels is not None and len(labels) > n else labels)


@dataclass
class SearchResult:
    """What the planner chose and what it saw (``report.search``)."""

    assignment: dict[str, int]
    account: dict = field(default_factory=dict)


class Planner:
    """Sensitivity, path and end-to-end checks on one gated session."""

    def __init__(self, gated, ladders: list[Ladder], metric: Metric, max_drop: float, *,
                 reference, feeds, labels, progress=None):
        self.gated, self.ladders, self.metric, self.max_drop = gated, ladders, metric, max_drop
        self.reference, self.feeds, self.labels = reference, feeds, labels
        self.baseline = metric.score(reference, reference, labels)
        self.progress = progress
        self.expected_checks = 1
        self.checks: list[dict] = []

    def sensitivities(self, samples: int) -> None:
        feeds, labels = subset(self.feeds, self.labels, samples)
        ref = self.gated.run({}, feeds) if feeds is not self.feeds else self.reference
        base = self.metric.score(ref, ref, labels)
        total = sum(len(lad.rungs) for lad in self.ladders)
        done = 0
        for lad in self.ladders:
            for j, rung in enumerate(lad.rungs):
                if self.progress:
                    self.progress(done, total, f"sensitivity {lad.layer}")
                done += 1
                out = self.gated.run({lad.layer: j}, feeds)
                rung.drop = base - self.metric.score(ref, out, labels)
                rung.distortion = runtime.compare_outputs(ref, out).worst_rel_l2

    def drop_of(self, assignment: dict[str, int], confidence: float = CONFIDENCE) -> float:
        """The assignment's drop bound (:func:`onnxlr.search.metrics.drop_bound`)."""
        if self.progress:   # bisection plus repair: about log2(steps) + REPAIR_CHECKS checks
            self.progress(len(self.checks), max(self.expected_checks, len(self.checks) + 1),
                          f"end-to-end check of {len(assignment)} layers")
        out = self.gated.run(assignment, self.feeds)
        drop = self.baseline - self.metric.score(self.reference, out, self.labels)
        bound = drop_bound(self.metric, self.reference, out, self.labels, drop=drop,
                           stop_above=self.max_drop, samples=input_samples(self.feeds),
                           confidence=confidence)
        self.checks.append({"layers": len(assignment), "drop": drop, "drop_bound": bound,
                            "confidence": confidence})
        return bound

    def feasible(self, assignment: dict[str, int], confidence: float = CONFIDENCE) -> bool:
        return self.drop_of(assignment, confidence) <= self.max_drop + 1e-12

    def longest_feasible(self, steps: list[Step]) -> int:
        """Largest t with steps[t-1] within the bound (0: the original), by bisection."""
        if not steps:
            return 0
        if self.feasible(steps[-1].as_dict()):
            return len(steps)
        lo, hi = 0, len(steps)  # lo feasible, hi not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.feasible(steps[mid - 1].as_dict()):
                lo = mid
            else:
                hi = mid
        return lo

    def repair(self, steps: list[Step], t: int, checks: int = REPAIR_CHECKS) -> dict[str, int]:
        """From the prefix of length ``t``, try later steps one at a time; keep those within
        the bound at :data:`REPAIR_CONFIDENCE` (each costs one gated run)."""
        current = steps[t - 1].as_dict() if t else {}
        for step in steps[t:][:checks]:
            if current.get(step.layer, -1) >= step.rung:
                continue
            trial = {**current, step.layer: step.rung}
            if self.feasible(trial, REPAIR_CONFIDENCE):
                current = trial
        return current


def predicted(ladders: list[Ladder], assignment: dict[str, int]) -> tuple[float, int]:
    """(ms saved, MACs saved) of an assignment, from the layers timed alone."""
    by = {lad.layer: lad for lad in ladders}
    ms = sum(by[k].rungs[j].saved_ms(by[k].ms_before) for k, j in assignment.items())
    macs = sum(by[k].rungs[j].macs_saved(by[k].macs_before) for k, j in assignment.items())
    return ms, macs


def predicted_speedup(ladders: list[Ladder], saved_ms: float, model_ms: float) -> float | None:
    """Whole-model speed-up from layer timings alone. Layers alone take longer than inside
    the model (no fused activations, cold caches), so the saving is taken as a share of the
    layers' own time and that share of the model's time (at most 95% of it)."""
    # a prune rung's saving is on its whole chain's time (producer and ops between included)
    layers_ms = sum(max([lad.ms_before] + [r.ms_before for r in lad.rungs if r.scope == "chain"])
                    for lad in ladders)
    if not model_ms or not layers_ms:
        return None
    share = min(0.95, layers_ms / model_ms)
    return 1.0 / (1.0 - share * min(saved_ms / layers_ms, 1.0) + 1e-12)


def choose(planner: Planner, steps: list[Step], *, model_ms: float, macs_total: int,
           target_speedup: float | None, target_flops: float | None) -> SearchResult:
    """The assignment for the objective: the fastest within the bound, or the smallest
    change that meets a target (if the bound allows it)."""
    t0 = time.perf_counter()
    planner.expected_checks = math.ceil(math.log2(len(steps) + 1)) + 1 + REPAIR_CHECKS
    best_t = planner.longest_feasible(steps)
    objective, target_t = "fastest within --max-drop", None
    if target_speedup is not None or target_flops is not None:
        objective = ("--target-speedup" if target_speedup is not None else "--target-flops")
        for t, step in enumerate(steps, 1):
            if target_speedup is not None:
                ok = (predicted_speedup(planner.ladders, step.saved_ms, model_ms) or 1.0) \
                    >= target_speedup
            else:
                ok = 1 - step.macs_saved / max(macs_total, 1) <= target_flops
            if ok:
                target_t = t
                break
    if target_t is not None and target_t <= best_t:
        assignment = steps[target_t - 1].as_dict()
    else:
        assignment = planner.repair(steps, best_t)
    ms, macs = predicted(planner.ladders, assignment)
    account = {
        "objective": objective, "path_steps": len(steps), "bisected_steps": best_t,
        "target_step": target_t, "layers_changed": len(assignment),
        "predicted_speedup": predicted_speedup(planner.ladders, ms, model_ms),
        "predicted_macs_ratio": 1 - macs / macs_total if macs_total else 1.0,
        "checks": list(planner.checks), "check_seconds": time.perf_counter() - t0,
    }
    return SearchResult(assignment, account)
