"""``search()``: ladders → gated graph → sensitivity → path → checks → one build.

(Building, refitting and judging one assignment is :mod:`onnxlr.search.judge`'s.)

Called by :func:`onnxlr.pipeline.optimize` when a metric (``--metric`` / ``--max-drop``)
is given. The model is built once, at the end, from the assignment the checks accepted;
then it is verified and timed end to end against the original, side by side, and
returned only if it is measured faster (otherwise the input comes back, and the report
says so): the search never hands back a slower model.
"""
from __future__ import annotations

import logging
import time

import onnx

from onnxlr import runtime
from onnxlr.methods import AUTO
from onnxlr.passes.factorize import Factorize
from onnxlr.passes.lstm_units import HiddenFit
from onnxlr.records import REVERTED
from onnxlr.search.gated import GatedModel
from onnxlr.search.ladders import AUTO_ALTERNATIVES, build_ladders
from onnxlr.search.judge import Judge, session_for
from onnxlr.search.metrics import CONFIDENCE, check_reference, resolve_metric
from onnxlr.search.planner import Planner, choose, greedy_path, subset
from onnxlr.search.hidden_pruning import HiddenBuilder, add_hidden_rungs
from onnxlr.search.pruning import PRUNE, PruneBuilder, add_prune_rungs

logger = logging.getLogger(__name__)

#: Default batch the layers and the whole model are timed at (at most the inputs' batch).
TIMING_BATCH = 64
#: Samples the per-rung sensitivity is scored on (the end-to-end checks use all) ...
SENSITIVITY_SAMPLES = 128
#: ... fewer (at least 8) when scoring every rung on that many would take longer than this.
SENSITIVITY_SECONDS = 60.0
#: The sequential refit sees at most this many of the fitting samples (each refitted layer
#: costs a run of both models on them); the prune rungs' statistics see them all.
REFIT_SAMPLES = 64


class _Pruners:
    """The prune rungs' builder in the gated graph: channels, or an LSTM's hidden units."""

    name = PRUNE

    def __init__(self, channels: PruneBuilder, hidden: HiddenBuilder):
        self.channels, self.hidden = channels, hidden

    def build(self, graph, site, fitted, names) -> None:
        (self.hidden if isinstance(fitted, HiddenFit) else self.channels).build(
            graph, site, fitted, names)


def search(build, verifier, original: onnx.ModelProto, timer, *, metric=None,
           max_drop: float | None = None, target_flops: float | None = None,
           target_speedup: float | None = None, progress=None,
           sensitivity_samples: int = SENSITIVITY_SAMPLES, timing_batch: int | None = None,
           evaluate: str | None = None, fit_batches: list[dict] | None = None):
    """Returns (model, records, comparison, account, latency) for the best assignment found.

    ``evaluate``: an ``.npz`` of inputs (and ``label``) the search never sees; the metric of
    the original and of the result on it is reported (``account["evaluation"]``)."""
    t0 = time.perf_counter()
    reference, labels = verifier.reference, verifier.labels
    check_reference(reference)
    metric = resolve_metric(metric, reference, labels)
    allowed = metric.default_max_drop if max_drop is None else float(max_drop)
    synthetic = verifier.description.startswith("seeded random")
    if synthetic:
        logger.warning("the metric is checked on SYNTHETIC random inputs: give --calib or "
                       "--inputs with real data, or the result may not hold on real inputs")
    timing = subset(verifier.feeds, None, timing_batch or TIMING_BATCH)[0]
    auto = build.config.methods == AUTO
    ladders, empty = build_ladders(build, timing, timer,
                                   multiple=max(8, build.config.rank_multiple), progress=progress,
                                   alternatives=AUTO_ALTERNATIVES if auto else None)
    t_ladders = time.perf_counter() - t0
    logger.info("search: %d layers with %d candidates measured faster alone (%d without) in "
                "%.0f s", len(ladders), sum(len(lad.rungs) for lad in ladders), len(empty),
                t_ladders)
    fits, pruned_account, builder = {}, None, None
    if auto and fit_batches:
        t_prune = time.perf_counter()
        chains, fits, pruned_account = add_prune_rungs(
            build, ladders, empty, timing, timer, fit_batches,
            multiple=max(8, build.config.rank_multiple), progress=progress)
        pruned_account["seconds"] = time.perf_counter() - t_prune
        t_hidden = time.perf_counter()
        hidden_fits, hidden_account = add_hidden_rungs(
            build, ladders, empty, timing, timer, fit_batches,
            multiple=max(8, build.config.rank_multiple), provider=verifier.provider,
            progress=progress)
        fits.update(hidden_fits)
        pruned_account["lstm_units"] = {**hidden_account,
                                        "seconds": time.perf_counter() - t_hidden}
        builder = _Pruners(PruneBuilder(chains), HiddenBuilder())
        logger.info("search: %d prune candidates on %d channel chains and %d on LSTM units in "
                    "%.0f s", pruned_account["fitted"], len(chains), hidden_account["fitted"],
                    time.perf_counter() - t_prune)
    t_ladders = time.perf_counter() - t0
    factorize = Factorize(build.config, cache=build.cache)

    def factors(method_name, site, ranks):
        if method_name == PRUNE:
            return fits[(site.node.name, int(ranks[0]))]
        return factorize.factors(factorize.method(method_name), site, tuple(ranks))

    def methods(name):
        return builder if name == PRUNE else factorize.method(name)

    t_gate = time.perf_counter()
    gated = GatedModel(build.prepared, {lad.layer: [r.option for r in lad.rungs]
                                        for lad in ladders},
                       factors, methods, provider=verifier.provider)
    t_gate = time.perf_counter() - t_gate
    logger.info("search: the gated graph (every candidate's factors, one session) in %.0f s",
                t_gate)
    planner = Planner(gated, ladders, metric, allowed, reference=reference,
                      feeds=verifier.feeds, labels=labels, progress=progress)
    t1 = time.perf_counter()
    gated.run({}, verifier.feeds)  # one timed run of the gated graph sizes the sensitivity set
    per_sample = (time.perf_counter() - t1) / max(_samples(verifier.feeds), 1)
    rungs = max(sum(len(lad.rungs) for lad in ladders), 1)
    samples = int(min(sensitivity_samples,
                      max(8, SENSITIVITY_SECONDS / (rungs * max(per_sample, 1e-9)))))
    planner.sensitivities(samples)
    t_sens = time.perf_counter() - t1
    logger.info("search: sensitivity of every candidate on %d samples in %.0f s", samples, t_sens)
    steps = greedy_path(ladders, allowed)
    base_session = runtime.make_session(build.prepared, provider=verifier.provider,
                                        threads=timer.threads)
    model_ms = runtime.interleaved_latency([base_session], timing, warmup=2,
                                           iterations=10, max_seconds=3.0).stats[0].median_ms
    macs_total = sum(lad.macs_before for lad in ladders)
    chosen = choose(planner, steps, model_ms=model_ms, macs_total=macs_total,
                    target_speedup=target_speedup, target_flops=target_flops)
    logger.info("search: %d path steps, %d end-to-end checks, %d layers changed (%.0f s)",
                len(steps), len(planner.checks), len(chosen.assignment),
                chosen.account["check_seconds"])
    judge = Judge(build, ladders, empty, allowed, metric, reference, labels, verifier,
                   _head(fit_batches, REFIT_SAMPLES), fits)
    judge.progress = progress
    built = judge(chosen.assignment)
    refit = None
    if fit_batches and steps:
        # the refit lowers every layer's error: go further along the path where it holds
        # (from the original itself when no step held the bound without it)
        t2 = time.perf_counter()
        built = judge.extend(steps, chosen.account["bisected_steps"], built,
                             target=target_speedup is None and target_flops is None)
        refit = {**built.refit, "seconds": time.perf_counter() - t2,
                 "checks": judge.refit_checks}
        logger.info("search: sequential refit: %d layers changed, metric %.4f (%s) after %d "
                    "refit checks", len(built.assignment), built.score,
                    "refit kept" if built.refit.get("kept") else "refit not kept",
                    judge.refit_checks)
    latency, in_place = None, None
    if built.assignment:
        built, latency, in_place = _without_slower_in_place(judge, built, original, timing,
                                                            verifier.provider, timer.threads)
    chosen.assignment = built.assignment
    chosen.account["layers_changed"] = len(built.assignment)
    model, records, outputs, score_after = built.model, built.records, built.outputs, built.score
    comparison = runtime.compare_outputs(reference, outputs)
    baseline = planner.baseline
    account = {
        "metric": metric.name, "metric_description": metric.description,
        "max_drop": allowed, "score_before": baseline, "score_after": score_after,
        "drop": baseline - score_after, "inputs": verifier.description,
        "synthetic_inputs": synthetic, "layers_with_ladders": len(ladders),
        "rungs": sum(len(lad.rungs) for lad in ladders), "gated_runs": gated.runs,
        "sensitivity_samples": min(samples, _samples(verifier.feeds)),
        "model_ms_before": model_ms, "target_speedup": target_speedup,
        "target_flops": target_flops, **chosen.account, "refit": refit,
        "pruning": pruned_account, "in_place": in_place,
        "seconds": {"ladders": t_ladders, "gated_graph": t_gate, "sensitivity": t_sens,
                    "total": time.perf_counter() - t0},
    }
    account["drop_bound"] = built.bound
    account["confidence"] = CONFIDENCE
    account["met_bound"] = account["drop_bound"] <= allowed + 1e-12
    if latency is not None and latency["speedup"] < 1.0:
        model, records, latency = _give_back(original, records, latency)
        account["returned"] = "input"
        account["score_after"], account["drop"], account["drop_bound"] = baseline, 0.0, 0.0
        comparison = runtime.compare_outputs(reference, reference)
    if evaluate is not None:
        account["evaluation"] = _evaluate(original, model, metric, evaluate, verifier.provider)
    if target_speedup is not None:
        account["target_met"] = bool(latency and latency["speedup"] >= target_speedup)
    elif target_flops is not None:
        got = sum(r.macs_after for r in records if r.kind) / max(
            sum(r.macs_before for r in records if r.kind), 1)
        account["target_met"] = got <= target_flops + 1e-9
    return model, records, comparison, account, latency


def _without_slower_in_place(judge, built, original, timing, provider, threads):
    """(built, its end-to-end latency, account): the changed layers that measured no faster
    inside the model are given back when the model without them holds the bound and
    measures faster (:mod:`onnxlr.search.in_place`)."""
    from onnxlr.accept import end_to_end, end_to_end_many
    from onnxlr.search import in_place

    def as_built(account):
        return built, end_to_end(original, built.model, timing, provider=provider,
                                 threads=threads), account

    if not in_place.affordable(original):
        return as_built({"skipped": "a model of 1 GB or more"})
    methods = {r.name: r.method for r in built.records if r.changed}
    slower = in_place.slower_in_place(original, built.model, timing,
                                      {k: methods.get(k) for k in built.assignment},
                                      provider=provider, threads=threads)
    rest = {k: j for k, j in built.assignment.items() if k not in slower}
    if not slower or not rest:
        return as_built({"slower": slower, "kept": "all"} if slower else None)
    trimmed = judge(rest, reasons={k: in_place.reason(t) for k, t in slower.items()})
    account = {"slower": slower, "kept": "all", "bound_without": trimmed.bound}
    if not judge.feasible(trimmed):
        return as_built(account)
    first, second = end_to_end_many(original, [built.model, trimmed.model], timing,
                                    provider=provider, threads=threads)
    account.update(speedup_all=first["speedup"], speedup_without=second["speedup"])
    logger.info("search: %d layers no faster in place; without them %.2fx, with %.2fx",
                len(slower), second["speedup"], first["speedup"])
    if second["speedup"] > first["speedup"]:
        account["kept"] = "without"
        return trimmed, second, account
    return built, first, account


def _evaluate(original, model, metric, path: str, provider: str) -> dict:
    """The metric on inputs the search never saw: original vs result."""
    from onnxlr.verify import _labels
    feeds = runtime.make_inputs(original, npz=path)
    labels = _labels(path)
    ref = runtime.run(session_for(original, provider), feeds)
    check_reference(ref)
    out = runtime.run(session_for(model, provider), feeds)
    before, after = metric.score(ref, ref, labels), metric.score(ref, out, labels)
    return {"inputs": f"{path} ({_samples(feeds)} samples, never seen by the search)",
            "score_before": before, "score_after": after, "drop": before - after}


def _head(batches: list[dict] | None, n: int) -> list[dict] | None:
    """The first batches holding ``n`` samples (the last one cut)."""
    if not batches:
        return batches
    out, have = [], 0
    for b in batches:
        size = _samples(b)
        if have + size > n:
            if n - have > 0:
                out.append({k: (v[:n - have] if getattr(v, "ndim", 0) >= 1 else v)
                            for k, v in b.items()})
            break
        out.append(b)
        have += size
    return out


def _samples(feeds) -> int:
    sizes = [v.shape[0] for v in feeds.values() if getattr(v, "ndim", 0) >= 1]
    return int(max(sizes)) if sizes else 1


def _give_back(original, records, latency):
    """Measured slower end to end: the input comes back unchanged, every change reverted."""
    import copy
    why = (f"the whole model measured {latency['speedup']:.2f}x ({latency['before_ms']:.3g} → "
           f"{latency['after_ms']:.3g} ms): the input is returned unchanged")
    for rec in records:
        if rec.changed:
            rec.status, rec.reason = REVERTED, why
            rec.params_after, rec.macs_after = rec.params_before, rec.macs_before
    latency = {**latency, "returned": "input", "after_ms": latency["before_ms"], "speedup": 1.0,
               "rejected_speedup": latency["speedup"]}
    return copy.deepcopy(original), records, latency
