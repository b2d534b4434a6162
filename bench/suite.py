"""Real trained models from PyPI wheels, optimised by onnxlr and checked on real inputs.

One command runs it all and writes ``bench/RESULTS.md``::

    pip install -e '.[cpu,bench]'
    python -m bench.suite                 # every model: hours on a loaded 2-core machine
    python -m bench.suite --quick         # fewer inputs and settings (smoke test)
    python -m bench.suite --models magika,ddddocr

For each model (``bench/real/<model>.py``: fetch, inputs, task metric) and each
setting (keyword arguments of :func:`onnxlr.pipeline.optimize`) it records the
params and MACs ratios, the ORT CPU speed-up measured A/B interleaved in one
process, the output error and the task metric on held-out inputs, and the
tool's own run time. Raw results go to ``bench/results/<model>.json``, saved after every
setting (quick unbounded settings run first), so a run stopped early keeps what it measured.
Time: the bounded settings back off layer by layer, re-verifying each time: on a shared 2-core
machine at load 8-13, ddddocr's default took 19 min and NudeNet's 29 min; the small models
take minutes.
Settings that use parameters this onnxlr lacks (``accept``, ``calib``) are
skipped, so the suite follows the library as it grows.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.real import MODELS  # noqa: E402
from bench.real.results import SCHEMA, read_fragments, render  # noqa: E402

logger = logging.getLogger("bench.suite")

#: every setting: (label, optimize kwargs, which models it runs on: None = all)
CONV = {"digits_cnn", "ddddocr", "nudenet", "magika"}
SETTINGS = [
    ("default", {"method": "auto", "rank": "vbmf"}, None),
    ("vbmf, no bound", {"method": "auto", "rank": "vbmf", "max_error": None}, None),
    ("auto 0.5", {"method": "auto", "rank": "0.5", "rank_multiple": 8, "max_error": None}, None),
    ("auto 0.25", {"method": "auto", "rank": "0.25", "rank_multiple": 8, "max_error": None}, None),
    ("auto 0.25, bound", {"method": "auto", "rank": "0.25", "rank_multiple": 8},
     {"digits_cnn", "sklearn_mlp", "magika"}),  # a second back-off: minutes on big models
    ("tucker 0.5", {"method": "tucker", "rank": "0.5", "rank_multiple": 8, "max_error": None},
     CONV - {"nudenet"}),
    ("cp 0.5", {"method": "cp", "rank": "0.5", "rank_multiple": 8, "max_error": None},
     CONV - {"nudenet", "magika"}),
    ("svd 0.5", {"method": "svd", "rank": "0.5", "rank_multiple": 8, "max_error": None},
     {"digits_cnn", "sklearn_mlp", "magika", "ddddocr"}),
    ("latency-aware", {"method": "auto", "rank": "vbmf", "rank_multiple": 8,
                       "accept": "latency"}, None),
    ("data-aware", {"method": "auto", "rank": "vbmf", "calib": "CALIB"}, None),
    # the metric search: calibration statistics, the task metric against the calibration
    # labels as a plug-in (TASK; NudeNet, without labels: box F1 against the original), one
    # point of it allowed to drop (NudeNet: box F1 >= 0.9, the goal)
    # (inputs None: the search holds half the calibration set out to judge on)
    ("search", {"method": "auto", "calib": "CALIB", "metric": "TASK", "max_drop": "DROP",
                "inputs": None}, None),
    # the same search allowed three points: what a user with that tolerance gets (ddddocr:
    # its hidden-unit rungs lose 1.4-2.4 points of exact match, more than one point allows)
    ("search 3 pt", {"method": "auto", "calib": "CALIB", "metric": "TASK",
                     "max_drop": 0.03, "inputs": None}, {"ddddocr"}),
]
#: --max-drop of the "search" setting, per model (default 0.01: one point)
SEARCH_DROP = {"nudenet": 0.1}
QUICK = {"default", "auto 0.25", "latency-aware"}


def machine(threads: int) -> dict:
    import onnx
    import onnxruntime
    import onnxlr
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(terse=True),
            "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
            "onnx": onnx.__version__, "numpy": np.__version__, "onnxlr": onnxlr.__version__,
            "threads": threads, "load_start": _load()}


def _load() -> str:
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def settings_for(model: str, quick: bool, params: set[str],
                 only: set[str] | None = None) -> list[tuple[str, dict]]:
    """The settings that apply to ``model`` and that this onnxlr's ``optimize`` accepts."""
    out = []
    for label, kwargs, models in SETTINGS:
        if (models is not None and model not in models) or (quick and label not in QUICK):
            continue
        if only and label not in only:
            continue
        if set(kwargs) - params:
            logger.info("skipping %r: optimize() has no %s", label, sorted(set(kwargs) - params))
            continue
        out.append((label, kwargs))
    return out


def setting_labels(text: str) -> set[str]:
    """``--settings``' comma-separated labels, where some labels hold a comma themselves
    ("vbmf, no bound"): adjacent pieces that join into a known label are one label."""
    known = {label for label, _, _ in SETTINGS}
    pieces, out = text.split(","), set()
    i = 0
    while i < len(pieces):
        for j in range(len(pieces), i, -1):
            joined = ",".join(pieces[i:j]).strip()
            if joined in known or j == i + 1:
                out.add(joined)
                i = j
                break
    return out


def run_all(session, feeds: list[dict]) -> list[dict]:
    from onnxlr import runtime
    return [runtime.run(session, f) for f in feeds]


def output_error(reference: list[dict], candidate: list[dict]) -> float:
    """Worst output's relative L2 error over all held-out feeds (float64; for non-float
    outputs such as labels, the fraction of elements that differ)."""
    worst = 0.0
    for name in reference[0]:
        ref = [np.asarray(r[name]) for r in reference]
        cand = [np.asarray(c[name]) for c in candidate]
        if ref[0].dtype.kind != "f":
            diff = sum(int(np.sum(a != b)) for a, b in zip(ref, cand))
            err = diff / max(1, sum(a.size for a in ref))
        else:
            num = sum(float(np.sum((a.astype(np.float64) - b) ** 2)) for a, b in zip(ref, cand))
            den = sum(float(np.sum(a.astype(np.float64) ** 2)) for a in ref)
            err = math_sqrt(num / den) if den > 0 else math_sqrt(num)
        worst = max(worst, err)
    return worst


def math_sqrt(x: float) -> float:
    return float(np.sqrt(x)) if np.isfinite(x) else float("inf")


def one_setting(task, label: str, kwargs: dict, ctx: dict, args) -> dict:
    """Optimise with one setting and measure the result against the original."""
    from onnxlr import runtime
    from onnxlr.pipeline import DEFAULT_MAX_ERROR, optimize
    special = {"CALIB": ctx["calib_npz"], "TASK": _task_metric(task),
               "DROP": SEARCH_DROP.get(task.name, 0.01)}
    kw = {k: special.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}
    extra = {"inputs": ctx["calib_npz"], "cp_max_seconds": args.cp_max_seconds,
             "timing_batch": _batch(task.timing),
             "measure_latency": False, "latency_cache": None, "threads": args.threads,
             "input_shapes": task.input_shapes}
    kw.update({k: v for k, v in extra.items() if k in ctx["params"] and k not in kw})
    row = {"setting": label, "measured": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
           "protocol": runtime.TIMING_PROTOCOL,
           "method": kw.get("method", "auto"), "rank": str(kw.get("rank")),
           "rank_multiple": kw.get("rank_multiple", 1), "bound": kw.get("max_error", DEFAULT_MAX_ERROR),
           "accept": kw.get("accept", "error"), "calib": "calib" in kw}
    if "metric" in kw:  # the search: its bound is the allowed drop of the task metric (or agreement)
        row["bound"] = kw.get("max_drop")
    t0 = time.perf_counter()
    try:
        model, report = optimize(str(task.model_path), **kw)
    except Exception as exc:  # a failing setting is a result too: show it, go on
        logger.exception("%s / %s failed", task.name, label)
        return {**row, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
                "seconds": time.perf_counter() - t0}
    row["seconds"] = time.perf_counter() - t0
    s = report.to_dict()["summary"]
    session = runtime.make_session(model, threads=args.threads)
    outputs = run_all(session, task.evaluate)
    lat = runtime.interleaved_latency([ctx["base"], session], task.timing, warmup=args.warmup,
                                      iterations=ctx["rounds"], max_seconds=args.max_seconds)
    base, cand = lat.stats
    speedup = lat.speedups[1]
    alt = _other_batch(task)
    if alt is not None:  # the same two models at a second batch size (1, or 8 when timed at 1)
        try:
            other = runtime.interleaved_latency([ctx["base"], session], alt, warmup=args.warmup,
                                                iterations=ctx["rounds"],
                                                max_seconds=args.max_seconds)
            row["speedup_other_batch"] = {"batch": _batch(alt), "speedup": other.speedups[1]}
        except Exception as exc:  # e.g. a model with a fixed batch dim
            logger.info("%s: no second batch size (%s)", task.name, str(exc).splitlines()[0])
    row.update({
        "layers": s["layers_changed"],
        "candidates": sum(1 for r in report.records if r.kind),
        "params_ratio": s["params_ratio"], "macs_ratio": s["macs_ratio"],
        "params_before": s["params_before"], "params_after": s["params_after"],
        "macs_before": s["macs_before"], "macs_after": s["macs_after"],
        "bound_met": s["bound_met"], "calib_error": s["output_error"],
        "output_error": output_error(ctx["reference"], outputs),
        "metric": task.score(outputs) if task.score else None,
        # the original's metric on the same held-out inputs, with this row (the inputs of
        # some tasks depend on the machine, e.g. magika's files)
        "baseline_metric": ctx.get("baseline_metric"),
        "agreement": task.agree(ctx["reference"], outputs),
        "speedup": speedup, "efficiency": speedup * s["macs_ratio"],
        "spread": max(base.p90_ms / base.p10_ms, cand.p90_ms / cand.p10_ms),
        "latency_ms": {"original": [base.p10_ms, base.median_ms, base.p90_ms],
                       "optimised": [cand.p10_ms, cand.median_ms, cand.p90_ms],
                       "rounds": base.iterations},
        "ranks": {r.name: list(r.ranks) for r in report.records if r.factorised and r.ranks},
        "kept_channels": {r.name: r.kept_channels for r in report.records if r.pruned},
        "methods": {r.name: r.method for r in report.records if r.changed},
    })
    if report.search:  # what the search saw: enough to tell why it chose what it chose
        keep = ("metric", "max_drop", "score_before", "score_after", "drop", "inputs",
                "layers_with_ladders", "rungs", "path_steps", "bisected_steps", "layers_changed",
                "gated_runs", "sensitivity_samples", "predicted_speedup", "checks", "seconds",
                "returned", "in_place")
        row["search"] = {k: report.search.get(k) for k in keep if k in report.search}
        row["search"]["declined"] = {r.name: r.reason for r in report.records
                                     if r.kind and not r.changed}
        # every layer's rungs as the search measured them: method, ranks (kept channels or
        # units), speed-up alone (a chain's for a prune rung), metric drop alone, chosen
        row["search"]["ladders"] = {
            r.name: [[c["method"], c["ranks"], round(c["speedup"], 3),
                      None if c["metric_drop"] is None else round(c["metric_drop"], 4),
                      c["chosen"]] for c in r.candidates]
            for r in report.records if r.candidates}
    return row


def _batch(feeds: dict) -> int | None:
    sizes = {v.shape[0] for v in feeds.values() if getattr(v, "ndim", 0) >= 1}
    return sizes.pop() if len(sizes) == 1 else None


def _other_batch(task) -> dict | None:
    """Feeds at batch 1 when the task is timed at a larger batch, else at batch 8."""
    batch = _batch(task.timing)
    if batch is None:
        return None
    if batch > 1:
        return {k: v[:1] for k, v in task.timing.items()}
    pool = task.evaluate[0]
    if (_batch(pool) or 0) < 8:
        return None
    return {k: v[:8] for k, v in pool.items()}


def _task_metric(task):
    """The search's ``optimize(metric=...)`` plug-in: the task metric against the
    calibration labels where the task has them (the issue's yardstick), else the task's
    agreement with the original (NudeNet: box F1 against the original's boxes)."""
    if task.labelled is not None and task.calib_labels is not None:
        def task_metric(reference: dict, candidate: dict, labels) -> float:
            return float(task.labelled(candidate, labels))
        task_metric.__name__ = f"{task.name}: {task.metric}"
        return task_metric

    def agreement(reference: dict, candidate: dict) -> float:
        return float(task.agree([reference], [candidate]))
    agreement.__name__ = f"{task.name}: {task.agreement}"
    return agreement


def timing_rounds(session, feeds: dict, args) -> int:
    """Interleaved rounds for one setting: ``--rounds``, or more for a model so fast that
    those would take under ``--time-target`` seconds (tiny models need many rounds)."""
    from onnxlr import runtime
    single = runtime.interleaved_latency([session], feeds, warmup=2, iterations=5).stats[0]
    per_round = 2 * single.median_ms / 1e3
    return int(min(5000, max(args.rounds, args.time_target / max(per_round, 1e-6))))


def run_model(name: str, args, params: set[str]) -> dict:
    from onnxlr import runtime
    t0 = time.perf_counter()
    module = importlib.import_module(f"bench.real.{name}")
    task = module.prepare(args.cache, quick=args.quick)
    logger.info("%s: prepared in %.0f s", name, time.perf_counter() - t0)
    with tempfile.TemporaryDirectory(prefix=f"onnxlr-{name}-") as tmp:
        calib_npz = str(Path(tmp) / "calib.npz")
        labels = {} if task.calib_labels is None else {"label": np.asarray(task.calib_labels)}
        np.savez(calib_npz, **task.calib, **labels)
        base = runtime.make_session(str(task.model_path), threads=args.threads)
        reference = run_all(base, task.evaluate)
        ctx = {"calib_npz": calib_npz, "base": base, "reference": reference, "params": params,
               "rounds": timing_rounds(base, task.timing, args),
               "baseline_metric": task.score(reference) if task.score else None}
        result = {
            "schema": SCHEMA, "name": name, "title": task.title, "source": task.source,
            "metric": task.metric, "agreement": task.agreement, "has_labels": task.score is not None,
            "notes": task.notes, "info": task.info, "quick": args.quick,
            "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "threads": args.threads, "rounds": ctx["rounds"], "machine": machine(args.threads),
            "baseline": {"metric": task.score(reference) if task.score else None},
            "rows": [],
        }
        chosen = settings_for(name, args.quick, params,
                              setting_labels(args.settings) if args.settings else None)
        order = {label: i for i, (label, _, _) in enumerate(SETTINGS)}
        previous = args.results / f"{name}.json"
        if args.settings and previous.exists():  # a partial rerun keeps the other rows
            ran = {label for label, _ in chosen}
            result["rows"] = [r for r in json.loads(previous.read_text()).get("rows", [])
                              if r.get("setting") not in ran and r.get("setting") in order]
        result["not_run"] = [label for label, _ in chosen]
        # unbounded settings are quick; bounded ones back off layer by layer (minutes on a big
        # model): run the quick ones first, and save after every setting, so that a run
        # stopped early still leaves what it measured
        for label, kwargs in sorted(chosen, key=lambda c: "max_error" not in c[1]):
            row = one_setting(task, label, kwargs, ctx, args)
            result["rows"] = sorted(result["rows"] + [row],
                                    key=lambda r: order.get(r["setting"], len(order)))
            result["not_run"].remove(label)
            logger.info("%s / %-18s MACs %s  speed-up %s  metric %s  agreement %s  (%.0f s)",
                        name, label, _fmt(row.get("macs_ratio")), _fmt(row.get("speedup")),
                        _fmt(row.get("metric")), _fmt(row.get("agreement")), row["seconds"])
            result["machine"]["load_end"] = _load()
            result["seconds"] = time.perf_counter() - t0
            save(result, args)
    return result


def save(result: dict, args) -> None:
    """Write the model's JSON (atomically) and re-render RESULTS.md from every model's JSON."""
    path = args.results / f"{result['name']}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
    tmp.replace(path)
    args.out.write_text(render(load_results(args.results), read_fragments(args.results)))


def load_results(folder: Path) -> list[dict]:
    """Every model's JSON in ``folder`` (rerun now or not), in registry order."""
    paths = [folder / f"{name}.json" for name in MODELS]
    return [json.loads(p.read_text()) for p in paths if p.exists()]


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.suite", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma list (default: all of {','.join(MODELS)})")
    parser.add_argument("--quick", action="store_true", help="fewer inputs and settings")
    parser.add_argument("--settings", default=None,
                        help="comma list of setting labels to run (default: all); the other "
                             "rows already in the model's JSON are kept")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "RESULTS.md")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results",
                        help="folder of per-model JSON and other scripts' Markdown fragments")
    parser.add_argument("--cache", type=Path, default=ROOT / "bench" / ".cache")
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op threads (default 2)")
    parser.add_argument("--rounds", type=int, default=30,
                        help="interleaved timing rounds (at least; more for fast models)")
    parser.add_argument("--time-target", type=float, default=4.0,
                        help="seconds of timing a setting should take at least")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--max-seconds", type=float, default=12.0,
                        help="stop timing one setting after this long (at least 5 rounds)")
    parser.add_argument("--cp-max-seconds", type=float, default=10.0)
    parser.add_argument("--render-only", action="store_true",
                        help="only rewrite --out from the JSON and fragments in --results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("onnxlr").setLevel(logging.WARNING)  # per-layer lines would drown the rows
    logging.getLogger("onnxlr.search.run").setLevel(logging.INFO)  # one line per search phase
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}: choose from {', '.join(MODELS)}")
    if args.quick:
        args.rounds, args.time_target = min(args.rounds, 15), min(args.time_target, 1.0)
    from onnxlr.settings import OPTION_NAMES
    params = set(OPTION_NAMES)
    args.results.mkdir(parents=True, exist_ok=True)
    if args.render_only:
        names = []
        args.out.write_text(render(load_results(args.results), read_fragments(args.results)))
    t0 = time.perf_counter()
    for name in names:
        run_model(name, args, params)
    logger.info("wrote %s in %.0f s", args.out, time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
