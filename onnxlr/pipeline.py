"""``optimize()``: prepare → factorise → verify (back off what breaks the bound) → provenance.

The flow follows the house sketch: prepare passes (Constant weights to
initializers, BatchNorm folding), the factorise pass, then an end-to-end check
with ONNX Runtime on the same inputs. When the output error exceeds the bound,
the layer that hurts most on its own is reverted and the check repeats, until
the bound holds (``on_exceed="revert"``, the default) — or the result is
handed back marked as failing (``on_exceed="fail"``).
"""
from __future__ import annotations

import json
import logging
import math
import time
from typing import Callable

import onnx

from onnxlr import __version__
from onnxlr.errors import OnnxlrError
from onnxlr.graph import to_graph, to_model, type_problem
from onnxlr.accept import accept_by_latency, end_to_end
from onnxlr.io import check_model, load_model, weights_by_reference
from onnxlr.latency import DEFAULT_MIN_LAYER_SPEEDUP
from onnxlr.methods import CHANNEL_METHODS, parse_method
from onnxlr.passes.factorize import Factorize, FactorizeConfig
from onnxlr.passes.prepare import name_nodes, prepare  # noqa: F401 (public: pipeline.prepare)
from onnxlr.rank import parse_rank
from onnxlr.records import FACTORISED, REVERTED, LayerRecord
from onnxlr.report import Report

logger = logging.getLogger(__name__)

#: Default end-to-end bound: relative L2 error of every output, on the verification inputs.
DEFAULT_MAX_ERROR = 0.05
#: The metric search judges on half the calibration set (up to 512 samples): a task metric
#: on a fifth of it (~100 samples) moves in 1-point steps. The refit fits on the other half.
SEARCH_HOLDOUT = {"holdout_fraction": 0.5, "holdout_cap": 512}


def parse_layer_ranks(specs: list[str]) -> list[tuple[str, object]]:
    """``['conv5*=16', 'fc?=energy:0.9']`` → [(glob, RankSelector)]."""
    out = []
    for spec in specs or []:
        if "=" not in spec:
            raise OnnxlrError(f"invalid --layer-rank {spec!r}: expected GLOB=RANK, e.g. 'conv5_*=16'")
        glob, rank = spec.rsplit("=", 1)
        out.append((glob, parse_rank(rank)))
    return out


class _Builder:
    """Factorise the prepared model, optionally keeping some layers; factors are cached."""

    def __init__(self, prepared: onnx.ModelProto, config: FactorizeConfig, progress):
        self.prepared, self.config, self.progress = prepared, config, progress
        self.cache: dict = {}
        self.make_pass = Factorize  # --method prune/thin: onnxlr.passes.prune sets its pass

    def __call__(self, keep: dict[str, str]) -> tuple[onnx.ModelProto, list[LayerRecord]]:
        graph = to_graph(self.prepared)
        result = self.make_pass(self.config, keep, self.cache, self.progress)(graph)
        self.progress = None  # progress is worth showing for the first (slow) build only
        return to_model(graph, self.prepared), result.records


def optimize(model: onnx.ModelProto | str, method: str = "auto", rank: str = "vbmf", *,
             rank_multiple: int = 1, include: list[str] | None = None,
             exclude: list[str] | None = None, layer_ranks: list[str] | None = None,
             max_error: float | None = DEFAULT_MAX_ERROR, on_exceed: str = "revert",
             verify: bool = True, input_shapes: dict | None = None, inputs: str | None = None,
             batch: int = 1, seed: int = 0, cp_max_seconds: float = 60.0,
             accept: str = "error", min_layer_speedup: float = DEFAULT_MIN_LAYER_SPEEDUP,
             provider: str = "cpu", threads: int | None = None,
             latency_cache: str | None = "default", measure_latency: bool = True,
             target_flops: float | None = None, target_speedup: float | None = None,
             profile: bool = False,
             calib=None, calib_samples: int | None = None,
             metric=None, max_drop: float | None = None, timing_batch: int | None = None,
             evaluate: str | None = None,
             progress: Callable | None = None) -> tuple[onnx.ModelProto, Report]:
    """Factorise a model's layers and check the result against the original.

    Args:
        model: a ModelProto or a path to a ``.onnx`` file.
        method: method spec, e.g. ``auto``, ``tucker``, ``cp``, ``svd``, ``auto,conv=cp``.
        rank: rank rule: ``32``, ``0.25``, ``energy:0.95`` or ``vbmf``.
        rank_multiple: round ranks up to a multiple of this (8 or 16 suit most hardware).
        include, exclude: node-name globs selecting the layers to factorise.
        layer_ranks: ``GLOB=RANK`` overrides of the rank rule for matching layers.
        max_error: bound on every output's relative L2 error (None: no bound).
        on_exceed: ``revert`` backs off layers until the bound holds; ``fail``
            returns the result with ``report.bound_met`` False.
        verify: run original and result with ONNX Runtime (needed for a bound).
        input_shapes: ``{input name: shape}`` for dynamic dims.
        inputs: ``.npz`` of real inputs keyed by input name, instead of random ones.
        batch: batch size for a dynamic leading dim of random inputs.
        cp_max_seconds: time bound for one CP decomposition.
        accept: ``error`` keeps what meets the error bound; ``latency`` also times
            each factorised layer alone on ``provider`` and keeps it only if it is at
            least ``min_layer_speedup`` times faster, and returns the input model
            unchanged if the whole result is not measured faster.
        provider, threads: ONNX Runtime provider (cpu | cuda | tensorrt) and intra-op
            threads for verification and latency.
        latency_cache: JSON file of layer timings (``default``: ~/.cache/onnxlr,
            None: in memory only).
        measure_latency: time original and result end to end at the end (needs verify).
        target_flops, target_speedup: a global budget (one of them): MACs of the candidate
            layers at most this fraction of before, or the whole model this many times faster.
            Ranks are then allocated across layers by measured sensitivity (``onnxlr.budget``)
            instead of the rank rule; ``max_error`` still bounds the result.
        profile: ORT-profile each layer inside the whole model, original vs result
            (``report.profile``).
        calib: calibration inputs (a ``.npz``, a folder of ``.npy``/``.npz``, or an iterable
            of feed dicts; see ``onnxlr.calib``): the layers' input statistics are captured
            once and the methods become data-aware (whitened SVD ranks and truncation, least-
            squares refit of Tucker/CP's last stage; ``onnxlr.linalg.whiten``). Without
            ``inputs``, verification runs on held-out calibration samples (the last fifth,
            at most 256; random inputs when fewer than 10), as ``report.verify_inputs`` says.
        calib_samples: use at most this many calibration samples.
        metric, max_drop: judge by what the user measures (``onnxlr.search``): a built-in
            name (``auto``, ``accuracy``, ``top1``, ``cosine``, ``rel_l2``, ``channels``),
            ``file.py:function``, ``module:function`` or a callable ``(reference, candidate
            [, labels]) -> score``; ``max_drop`` bounds the score's loss (default: the
            metric's own). Either one switches to the global search: every layer's ladder of
            candidates measured alone, scored in one gated ONNX Runtime session, allocated
            greedily and checked end to end; ``max_error`` and the rank rule are then not
            used, ``target_flops``/``target_speedup`` become the search's objective.
        timing_batch: the batch layers and the whole model are timed at in the search
            (default: the verification inputs' batch, at most 64).
        evaluate: ``.npz`` of held-out inputs (and ``label``) the search never sees: the
            metric of the original and the result on them goes into ``report.search``.

    Returns:
        The optimised model and a :class:`Report` of every candidate layer.
    """
    t0 = time.perf_counter()
    if on_exceed not in ("revert", "fail"):
        raise OnnxlrError(f"invalid on_exceed {on_exceed!r}: choose revert or fail")
    if max_error is not None and not max_error > 0:
        raise OnnxlrError(f"invalid --max-error {max_error}: must be > 0")
    if max_error is not None and not verify:
        raise OnnxlrError("--max-error needs verification: drop --no-verify or use --max-error none")
    if rank_multiple < 1:
        raise OnnxlrError(f"invalid --rank-multiple {rank_multiple}: must be >= 1")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise OnnxlrError(f"invalid --batch {batch}: must be an integer >= 1")
    if not (isinstance(cp_max_seconds, (int, float)) and math.isfinite(cp_max_seconds)
            and cp_max_seconds > 0):
        raise OnnxlrError(f"invalid --cp-max-seconds {cp_max_seconds}: must be a finite "
                          f"number > 0")
    if accept not in ("error", "latency"):
        raise OnnxlrError(f"invalid --accept {accept!r}: choose error or latency")
    if accept == "latency" and not verify:
        raise OnnxlrError("--accept latency measures with ONNX Runtime: drop --no-verify")
    if not min_layer_speedup > 0:
        raise OnnxlrError(f"invalid --min-layer-speedup {min_layer_speedup}: must be > 0")
    budgeted = target_flops is not None or target_speedup is not None
    searched = metric is not None or max_drop is not None
    if timing_batch is not None and not (isinstance(timing_batch, int) and timing_batch >= 1):
        raise OnnxlrError(f"invalid --timing-batch {timing_batch}: must be an integer >= 1")
    if evaluate is not None and not searched:
        raise OnnxlrError("--eval reports the --metric on held-out inputs: give --metric too")
    if searched:
        from onnxlr.search.metrics import check_max_drop
        check_max_drop(max_drop)
        if not verify:
            raise OnnxlrError("--metric/--max-drop are checked with ONNX Runtime: drop --no-verify")
        if method.strip() in CHANNEL_METHODS:
            raise OnnxlrError(f"--metric searches factorisations; --method {method.strip()} is "
                              f"not one of its methods yet (use --rank/--max-error with it)")
        max_error = None  # the metric is the bound
    if target_flops is not None and target_speedup is not None:
        raise OnnxlrError("give one budget: --target-flops or --target-speedup, not both")
    if profile and not verify:
        raise OnnxlrError("--profile runs ONNX Runtime: drop --no-verify")
    if budgeted and not verify:
        raise OnnxlrError("a budget is allocated from measurements: drop --no-verify")
    config = FactorizeConfig(methods=parse_method(method), rank=parse_rank(rank),
                             rank_multiple=rank_multiple, include=list(include or []),
                             exclude=list(exclude or []),
                             layer_ranks=parse_layer_ranks(layer_ranks or []),
                             cp_max_seconds=cp_max_seconds)
    source = model if isinstance(model, str) else None
    original = load_model(model) if isinstance(model, str) else model
    build = _Builder(prepare(original), config, progress)
    heldout = None
    if method.strip() in CHANNEL_METHODS:  # --- prune/thin: a channel pass replaces Factorize
        from onnxlr.passes.channel_setup import setup_channel_method
        heldout = setup_channel_method(build, method.strip(), calib,
                                       holdout=verify and inputs is None,
                                       max_samples=calib_samples, seed=seed, provider=provider,
                                       target_flops=target_flops, accept=accept)
        target_flops, budgeted = None, False  # a MAC target is the pass's own (one keep fraction)
    elif calib is not None:  # data-aware: layer input statistics before the first build
        from onnxlr.activations import calibrate
        from onnxlr.calib import load_calibration
        calib = load_calibration(calib, build.prepared, max_samples=calib_samples)  # read once
        heldout = calibrate(build.prepared, config, calib, holdout=verify and inputs is None,
                            max_samples=calib_samples, seed=seed, provider=provider,
                            progress=progress,
                            **(SEARCH_HOLDOUT if searched else {}))
    keep: dict[str, str] = {}
    result, records = (None, []) if budgeted or searched else build(keep)
    if result is not None and accept == "error" and (max_error is None or on_exceed == "fail"):
        # no later build (no back-off, no latency trials): the factors live on in the result
        # only; kept, they were a float64 copy of every factorised layer (0.8 GB at 1.2B params)
        build.cache.clear()
        from onnxlr.machine import release_freed_memory
        release_freed_memory()
    report = Report(source=source, method=method, rank=rank, rank_multiple=rank_multiple,
                    max_error=max_error, records=records,
                    accept="search" if searched else accept)
    if verify:
        from onnxlr.verify import VerificationUnavailable, Verifier  # lazy: imports onnxruntime
        try:
            verifier = Verifier(original, input_shapes=input_shapes,
                                npz=heldout.path if heldout else inputs, batch=batch,
                                seed=seed, max_error=max_error, provider=provider)
        except VerificationUnavailable as exc:
            # ORT cannot run the model: fine only when nothing was asked that needs a run
            # (the end-to-end timing is then skipped, not an error)
            if heldout:
                heldout.cleanup()
            if max_error is not None or budgeted or accept == "latency" or profile:
                raise
            logger.warning("%s", exc)
            report.verify_inputs, verify = str(exc), False
    if verify:
        if heldout:
            verifier.description = heldout.description
            heldout.cleanup()
        timer = _timer(build, provider, threads, latency_cache)
        if searched:
            from onnxlr.search.run import search
            timer.seconds_per_pair = 0.3
            result, records, comparison, report.search, report.latency = search(
                build, verifier, original, timer, metric=metric, max_drop=max_drop,
                target_flops=target_flops, target_speedup=target_speedup, progress=progress,
                timing_batch=timing_batch, evaluate=evaluate,
                fit_batches=_fit_batches(build.prepared, calib, calib_samples, heldout))
            report.records, report.comparison = records, comparison
            if report.latency is None and measure_latency:
                report.latency = end_to_end(original, result, verifier.feeds,
                                            provider=provider, threads=threads)
        elif budgeted:
            result, records = _allocate(build, verifier, keep, report, timer, original,
                                        target_flops=target_flops,
                                        target_speedup=target_speedup, progress=progress)
        if not searched:
            comparison = verifier.compare(result)
            if max_error is not None and not comparison and on_exceed == "revert":
                result, records, comparison = _back_off(build, verifier, records, comparison, keep)
                if report.budget is not None:
                    report.budget["backed_off"] = True
            if accept == "latency":
                result, records, comparison = _accept_latency(
                    build, verifier, records, keep, timer, min_layer_speedup=min_layer_speedup,
                    on_exceed=on_exceed)
            report.records, report.comparison = records, comparison
            if measure_latency or accept == "latency":
                report.latency = end_to_end(original, result, verifier.feeds, provider=provider,
                                            threads=threads)
                if accept == "latency" and report.latency["speedup"] < 1.0:
                    result, report = _give_back(original, report)
                    report.comparison = verifier.compare(result)
        if report.budget is not None:
            _settle_budget(report)
        if profile:
            from onnxlr.profiling import compare_profiles  # lazy: imports onnxruntime
            report.profile = compare_profiles(original, result, verifier.feeds,
                                              provider=provider, threads=threads,
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
    build.config.forced_ranks.update(ranks)
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
        if rec.status == FACTORISED:
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
                  if r.status == FACTORISED and r.name != name}
        model, recs = build({**keep, **others})
        rec = next(r for r in recs if r.name == name)
        return (verifier.compare(model).worst_rel_l2 if rec.status == FACTORISED else None), rec

    solo = {r.name: alone(r.name)[0] for r in records if r.status == FACTORISED}
    measured = dict(solo)
    reverted: dict[str, str] = {}
    scale = build.config.rank_scale
    while not comparison and solo:
        worst = max(solo, key=solo.get)
        scale[worst] = scale.get(worst, 1.0) * 2
        error, rec = alone(worst)
        if rec.ranks is not None:
            first[worst] = rec  # report the ranks last tried, not the first ones
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
    layers = {r.name: {"method": r.method, "ranks": list(r.ranks)}
              for r in report.records if r.status == FACTORISED}
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
