"""``optimize()``: options → prepare → factorise → verify (back off what breaks the bound) →
provenance.

The options come in as one validated, frozen :class:`~onnxlr.settings.OptimizeOptions`
(keyword arguments build or replace it). The flow follows the house sketch: prepare passes
(Constant weights to initializers, BatchNorm folding), the factorise pass, then an end-to-end
check with ONNX Runtime on the same inputs. When the output error exceeds the bound,
the layer that hurts most on its own is reverted and the check repeats, until
the bound holds (``on_exceed="revert"``, the default) — or the result is
handed back marked as failing (``on_exceed="fail"``).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Callable

import onnx

from onnxlr import __version__
from onnxlr.errors import OnnxlrError
from onnxlr.graph import to_graph, to_model, type_problem
from onnxlr.accept import accept_by_latency, end_to_end
from onnxlr.io import check_model, load_model, weights_by_reference
from onnxlr.passes.factorize import Factorize, FactorizeConfig
from onnxlr.passes.prepare import name_nodes, prepare  # noqa: F401 (public: pipeline.prepare)
from onnxlr.records import REVERTED, LayerRecord
from onnxlr.report import Report
from onnxlr.settings import OptimizeOptions, default, make_options
from onnxlr.settings import parse_layer_ranks  # noqa: F401 (re-exported: its old home)

logger = logging.getLogger(__name__)

#: Default end-to-end bound: relative L2 error of every output, on the verification inputs
#: (the ``max_error`` option's default, written in ``onnxlr.settings``).
DEFAULT_MAX_ERROR = default("max_error")
#: The metric search judges on half the calibration set (up to 512 samples): a task metric
#: on a fifth of it (~100 samples) moves in 1-point steps. The refit fits on the other half.
SEARCH_HOLDOUT = {"holdout_fraction": 0.5, "holdout_cap": 512}


class _Builder:
    """Factorise the prepared model, optionally keeping some layers; factors are cached.

    The builder owns its (frozen) config: the rooms that re-rank layers (back-off, latency
    acceptance, budgets) hand it the changed fields through :meth:`reconfigure`.
    """

    def __init__(self, prepared: onnx.ModelProto, config: FactorizeConfig, progress):
        self.prepared, self.config, self.progress = prepared, config, progress
        self.cache: dict = {}
        self.make_pass = Factorize  # --method prune/thin: onnxlr.passes.prune sets its pass

    def reconfigure(self, **changes) -> None:
        """From now on build with a copy of the config with ``changes`` (dataclasses.replace)."""
        self.config = dataclasses.replace(self.config, **changes)

    def __call__(self, keep: dict[str, str]) -> tuple[onnx.ModelProto, list[LayerRecord]]:
        graph = to_graph(self.prepared)
        result = self.make_pass(self.config, keep, self.cache, self.progress)(graph)
        self.progress = None  # progress is worth showing for the first (slow) build only
        return to_model(graph, self.prepared), result.records


def optimize(model: onnx.ModelProto | str, method: str | OptimizeOptions | None = None,
             rank: str | None = None, *, options: OptimizeOptions | None = None,
             progress: Callable | None = None, **overrides) -> tuple[onnx.ModelProto, Report]:
    """Factorise a model's layers and check the result against the original.

    Args:
        model: a ModelProto or a path to a ``.onnx`` file.
        method, rank: the method and rank specs (``optimize(model, "tucker", "0.5")``), as
            the ``method``/``rank`` options; or ``method`` is the whole
            :class:`~onnxlr.settings.OptimizeOptions` (``optimize(model, opts)``).
        options: the options (default: every default); keyword arguments replace fields of
            it, so ``optimize(model, max_error=None, verify=False)`` and
            ``optimize(model, options=opts, batch=4)`` both work. What each option means and
            its default: :class:`~onnxlr.settings.OptimizeOptions`.
        progress: called with (index, total, label) as the work goes on.

    Raises:
        TypeError: a keyword that is no option (the message names it).
        OptionError: a bad value or options that exclude each other (a ``ValueError`` and an
            ``OnnxlrError``; the message names the option).

    Returns:
        The optimised model and a :class:`Report` of every candidate layer.
    """
    t0 = time.perf_counter()
    if isinstance(method, OptimizeOptions):
        if options is not None:
            raise TypeError("optimize() got the options twice: positionally and as options=")
        options, method = method, None
    given = {k: v for k, v in (("method", method), ("rank", rank)) if v is not None}
    o = make_options(options, **given, **overrides)
    verify, calib = o.verify, o.calib
    searched, budgeted, target_flops = o.searched, o.budgeted, o.target_flops
    max_error = None if searched else o.max_error  # with a metric, the metric is the bound
    config = FactorizeConfig(methods=dict(o.method_plan), rank=o.rank_rule,
                             rank_multiple=o.rank_multiple, include=list(o.include),
                             exclude=list(o.exclude), layer_ranks=list(o.layer_rank_rules),
                             cp_max_seconds=o.cp_max_seconds)
    source = model if isinstance(model, str) else None
    original = load_model(model) if isinstance(model, str) else model
    build = _Builder(prepare(original), config, progress)
    heldout = None
    if o.channel_method:  # --- prune/thin: a channel pass replaces Factorize
        from onnxlr.passes.channel_setup import setup_channel_method
        heldout = setup_channel_method(build, o.channel_method, calib,
                                       holdout=verify and o.inputs is None,
                                       max_samples=o.calib_samples, seed=o.seed,
                                       provider=o.provider, target_flops=target_flops,
                                       accept=o.accept)
        target_flops, budgeted = None, False  # a MAC target is the pass's own (one keep fraction)
    elif calib is not None:  # data-aware: layer input statistics before the first build
        from onnxlr.activations import calibrate
        from onnxlr.calib import load_calibration
        calib = load_calibration(calib, build.prepared, max_samples=o.calib_samples)  # read once
        build.config, heldout = calibrate(build.prepared, config, calib,
                                          holdout=verify and o.inputs is None,
                                          max_samples=o.calib_samples, seed=o.seed,
                                          provider=o.provider, progress=progress,
                                          **(SEARCH_HOLDOUT if searched else {}))
    keep: dict[str, str] = {}
    result, records = (None, []) if budgeted or searched else build(keep)
    if result is not None and o.accept == "error" and (o.max_error is None
                                                      or o.on_exceed == "fail"):
        # no later build (no back-off, no latency trials): the factors live on in the result
        # only; kept, they were a float64 copy of every factorised layer (0.8 GB at 1.2B params)
        build.cache.clear()
        from onnxlr.machine import release_freed_memory
        release_freed_memory()
    report = Report(source=source, method=o.method, rank=o.rank, rank_multiple=o.rank_multiple,
                    max_error=max_error, records=records,
                    accept="search" if searched else o.accept)
    if verify:
        from onnxlr.verify import VerificationUnavailable, Verifier  # lazy: imports onnxruntime
        try:
            verifier = Verifier(original, input_shapes=o.input_shapes,
                                npz=heldout.path if heldout else o.inputs, batch=o.batch,
                                seed=o.seed, max_error=max_error, provider=o.provider)
        except VerificationUnavailable as exc:
            # ORT cannot run the model: fine only when nothing was asked that needs a run
            # (the end-to-end timing is then skipped, not an error)
            if heldout:
                heldout.cleanup()
            if max_error is not None or budgeted or o.accept == "latency" or o.profile:
                raise
            logger.warning("%s", exc)
            report.verify_inputs, verify = str(exc), False
    if verify:
        if heldout:
            verifier.description = heldout.description
            heldout.cleanup()
        timer = _timer(build, o.provider, o.threads, o.latency_cache)
        if searched:
            from onnxlr.search.run import search
            timer.seconds_per_pair = 0.3
            result, records, comparison, report.search, report.latency = search(
                build, verifier, original, timer, metric=o.metric, max_drop=o.max_drop,
                target_flops=target_flops, target_speedup=o.target_speedup, progress=progress,
                timing_batch=o.timing_batch, evaluate=o.evaluate,
                fit_batches=_fit_batches(build.prepared, calib, o.calib_samples, heldout))
            report.records, report.comparison = records, comparison
            if report.latency is None and o.measure_latency:
                report.latency = end_to_end(original, result, verifier.feeds,
                                            provider=o.provider, threads=o.threads)
        elif budgeted:
            result, records = _allocate(build, verifier, keep, report, timer, original,
                                        target_flops=target_flops,
                                        target_speedup=o.target_speedup, progress=progress)
        if not searched:
            comparison = verifier.compare(result)
            if max_error is not None and not comparison and o.on_exceed == "revert":
                result, records, comparison = _back_off(build, verifier, records, comparison, keep)
                if report.budget is not None:
                    report.budget["backed_off"] = True
            if o.accept == "latency":
                result, records, comparison = _accept_latency(
                    build, verifier, records, keep, timer,
                    min_layer_speedup=o.min_layer_speedup, on_exceed=o.on_exceed)
            report.records, report.comparison = records, comparison
            if o.measure_latency or o.accept == "latency":
                report.latency = end_to_end(original, result, verifier.feeds,
                                            provider=o.provider, threads=o.threads)
                if o.accept == "latency" and report.latency["speedup"] < 1.0:
                    result, report = _give_back(original, report)
                    report.comparison = verifier.compare(result)
        if report.budget is not None:
            _settle_budget(report)
        if o.profile:
            from onnxlr.profiling import compare_profiles  # lazy: imports onnxruntime
            report.profile = compare_profiles(original, result, verifier.feeds,
                                              provider=o.provider, threads=o.threads,
                                              layers=[r.name for r in report.records])
        report.accuracy = verifier.accuracies(result)
        report.verify_inputs = verifier.description
        from onnxlr.counting import recount
        recount(build.prepared, result, report.records, verifier.feeds)
    report.calibrated = calib is not None
    report.weights_by_reference = weights_by_reference(original)
    result = add_provenance(result, report)
    check_model(result, what="optimised model")
    if not verify:
        _check_loadable(original, result)
    report.seconds = time.perf_counter() - t0
    return result, report


#: At most this many calibration samples feed the search's fits (the prune rungs' statistics
#: all of them, the sequential refit the first ``search.run.REFIT_SAMPLES``).
FIT_SAMPLES = 512


def _fit_batches(prepared, calib, calib_samples, heldout) -> list[dict] | None:
    """The calibration samples the layer statistics came from (never the held-out ones the
    search judges on), at most :data:`FIT_SAMPLES`, as feed batches; None without --calib."""
    if calib is None:
        return None
    from onnxlr.activations import _holdout_size
    from onnxlr.calib import load_calibration
    source = load_calibration(calib, prepared, max_samples=calib_samples)
    if heldout is not None:
        source = source.split(_holdout_size(source, SEARCH_HOLDOUT["holdout_fraction"],
                                            SEARCH_HOLDOUT["holdout_cap"]))[0]
    return list(source.head(min(FIT_SAMPLES, source.num_samples)))


def _check_loadable(original: onnx.ModelProto, result: onnx.ModelProto) -> None:
    """Unverified, the result is still never one ONNX Runtime cannot load, where that can be
    told without running it: strict type inference must accept it whenever it accepts the
    original."""
    problem = type_problem(result)
    if problem and type_problem(original) is None:
        raise OnnxlrError(f"optimised model: ONNX type inference refuses it ({problem}), so "
                          f"ONNX Runtime would not load it; nothing written (an onnxlr bug: "
                          f"please report it)")


def _timer(build: _Builder, provider, threads, latency_cache):
    """The layer timer shared by latency acceptance and budgets (same factor cache)."""
    from onnxlr.latency import LayerTimer, TimingCache, default_cache_path

    cache = TimingCache(default_cache_path() if latency_cache == "default" else latency_cache)
    prepared = build.prepared
    return LayerTimer(build.config, {o.domain: o.version for o in prepared.opset_import},
                      prepared.ir_version, factor_cache=build.cache, timing_cache=cache,
                      provider=provider, threads=threads)


def _allocate(build: _Builder, verifier, keep, report: Report, timer, original, *,
              target_flops, target_speedup, progress):
    """Measure every layer's ladder, allocate ranks greedily for the budget, build."""
    from onnxlr import budget

    layers = budget.selected_layers(build)
    ladders = budget.build_ladders(build, verifier.feeds, layers, timer,
                                   max(8, build.config.rank_multiple), progress=progress)
    model_ms = None
    if target_speedup is not None:
        model_ms = end_to_end(original, original, verifier.feeds, provider=timer.provider,
                              threads=timer.threads, iterations=20)["before_ms"]
    macs_total = sum(r.macs_before for r in layers)
    ranks, account = budget.plan(ladders, target_flops=target_flops,
                                 target_speedup=target_speedup, macs_total=macs_total,
                                 model_ms=model_ms)
    account["model_ms_before"] = model_ms
    report.budget = account
    build.reconfigure(forced_ranks={**build.config.forced_ranks, **ranks})
    for rec in layers:
        if rec.name not in ranks:
            keep[rec.name] = "budget: the target was met without this layer"
    result, records = build(keep)
    by_name = {lad.name: lad for lad in ladders}
    for rec in records:
        lad = by_name.get(rec.name)
        if lad is not None:
            rec.candidates = [t.to_dict(t.ranks == rec.ranks) for t in lad.options]
            chosen = next((t for t in lad.options if t.ranks == rec.ranks), None)
            if chosen is not None:
                rec.latency_before_ms, rec.latency_after_ms = chosen.ms_before, chosen.ms_after
                rec.extra["local_error"] = chosen.local_error
    return result, records


def _settle_budget(report: Report) -> None:
    """Achieved values next to the targets, and which constraint bound."""
    b = report.budget
    macs_ratio = report.macs_after / report.macs_before if report.macs_before else 1.0
    speedup = (report.latency or {}).get("speedup")
    b["achieved_macs_ratio"], b["achieved_speedup"] = macs_ratio, speedup
    met = (macs_ratio <= b["target_flops"] + 1e-9 if b["target_flops"] is not None
           else speedup is not None and speedup >= b["target_speedup"])
    b["target_met"] = met
    if met:
        b["bound"] = "target"
    elif not b["reachable"]:
        b["bound"] = "target unreachable: every layer at its cheapest measured option"
    elif b.get("backed_off"):
        b["bound"] = "max-error: ranks grown to meet the error bound"
    else:
        b["bound"] = "measurement: layer timings alone over-predicted the whole-model speed-up"


def _accept_latency(build: _Builder, verifier, records, keep, timer, *, min_layer_speedup,
                    on_exceed):
    """Time each factorised layer alone; keep the fastest candidate ranks of the layers that
    are faster, revert the rest, then re-check the error bound on the rebuilt model."""
    result, records = accept_by_latency(build, verifier, records, keep, timer, min_layer_speedup)
    comparison = verifier.compare(result)
    if verifier.max_error is not None and not comparison and on_exceed == "revert":
        # rounding ranks up only lowers each layer's error, but errors need not add up
        result, records, comparison = _back_off(build, verifier, records, comparison, keep)
    return result, records, comparison


def _give_back(original: onnx.ModelProto, report: Report) -> tuple[onnx.ModelProto, Report]:
    """The whole result was not measured faster: return the input model, every layer reverted."""
    import copy

    lat = report.latency
    why = (f"the whole model measured {lat['speedup']:.2f}x ({lat['before_ms']:.3g} → "
           f"{lat['after_ms']:.3g} ms): --accept latency returns the input unchanged")
    for rec in report.records:
        if rec.changed:
            rec.status, rec.reason = REVERTED, why
    report.latency = {**lat, "returned": "input", "after_ms": lat["before_ms"], "speedup": 1.0,
                      "rejected_speedup": lat["speedup"]}
    return copy.deepcopy(original), report


def _back_off(build: _Builder, verifier, records, comparison, keep):
    """Grow the ranks of the layer that alone adds most output error (×2 each time), or revert
    it once bigger ranks stop saving work, until the bound holds."""
    first = {r.name: r for r in records}
    entered = dict(first)

    def alone(name: str) -> tuple[float | None, LayerRecord]:
        others = {r.name: "measuring one layer alone" for r in records
                  if r.changed and r.name != name}
        model, recs = build({**keep, **others})
        rec = next(r for r in recs if r.name == name)
        return (verifier.compare(model).worst_rel_l2 if rec.changed else None), rec

    solo = {r.name: alone(r.name)[0] for r in records if r.changed}
    measured = dict(solo)
    reverted: dict[str, str] = {}
    while not comparison and solo:
        worst = max(solo, key=solo.get)
        scale = build.config.rank_scale
        build.reconfigure(rank_scale={**scale, worst: scale.get(worst, 1.0) * 2})
        error, rec = alone(worst)
        if rec.ranks is not None or rec.kept_channels is not None:
            first[worst] = rec  # report the ranks (channels) last tried, not the first ones
        if error is None:  # bigger ranks would not save anything: give the layer back
            reverted[worst] = keep[worst] = (
                f"alone it adds output error {solo.pop(worst):.4g} at its largest saving ranks; "
                f"the model missed --max-error {verifier.max_error:g}")
        else:
            solo[worst] = measured[worst] = error
        result, records = build(keep)
        comparison = verifier.compare(result)
    final = []
    for rec in records:
        if rec.name in reverted:
            built = rec
            rec = first[rec.name]  # keep the method, ranks and errors of its last try
            rec.status, rec.reason = REVERTED, reverted[rec.name]
            # but the counts of the model returned (prune/thin: a neighbour may change it)
            rec.params_before, rec.macs_before = built.params_before, built.macs_before
        rec.output_error = measured.get(rec.name, rec.output_error)
        earlier = entered.get(rec.name)
        if earlier is not None and not rec.candidates:  # measurements of a budget's search
            rec.candidates = earlier.candidates
        final.append(rec)
    return result, final, comparison


def add_provenance(model: onnx.ModelProto, report: Report) -> onnx.ModelProto:
    """Record onnxlr's version, settings and per-layer ranks in ``metadata_props``."""
    layers = {r.name: ({"method": r.method, "ranks": list(r.ranks)} if r.factorised else
                       {"method": r.method, "kept_channels": r.kept_channels})
              for r in report.records if r.changed}
    # calibration data shaped the result if any layer used its statistics, or if the pass
    # itself fitted on it (channel pruning, thin layers, the search's refit and judging)
    calibrated = report.calibrated or any(r.extra.get("data_aware") for r in report.records)
    entries = {"onnxlr.version": __version__, "onnxlr.method": report.method,
               "onnxlr.calibration": "yes" if calibrated else "no",
               "onnxlr.rank": report.rank, "onnxlr.layers": json.dumps(layers, sort_keys=True)}
    if report.search:
        entries["onnxlr.search"] = json.dumps(
            {k: report.search.get(k) for k in ("metric", "max_drop", "score_before",
                                                "score_after", "inputs")}, sort_keys=True)
    kept = [p for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)
    return model
