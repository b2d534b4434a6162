"""Channel pruning and thin layers, data-aware vs data-free, and vs factorisation at equal MACs.

For each keep fraction f (every channel chain keeps ceil(f·C) channels, so all
channel variants have the same architecture and the same MACs) the model is
rewritten five ways:

* ``L1 + drop`` — data-free filter pruning (Li et al. 2017, arXiv 1608.08710):
  the producer keeps its largest-L1 filters, the consumer loses the columns.
* ``thin + drop`` — data-free thin layers (Lu et al. 2017): SOMP rows, columns dropped.
* ``L1 + LS`` — L1 selection, consumer refit by least squares on calibration data.
* ``thin + LS`` — SOMP selection, least-squares refit (``--method thin --calib``).
* ``prune`` — He et al. 2017: LASSO channel selection and least squares, sequential
  (``--method prune --calib``).

and factorised (``--method auto``: SVD for Gemm/1×1, Tucker-2 for k×k) at the rank
fraction whose MACs come closest to the channel variants', weights only and
data-aware (whitened SVD / refit, ``onnxlr.activations``). No error bound, no
back-off: the raw effect. Output error and task metric on held-out inputs that
calibration never saw; speed-up measured A/B interleaved in one process.

Digits: calibration = the 1347 training images (``bench/data/digits_train_8x8.npz``,
the train split of ``tools/train_digits_cnn.py``), evaluation = the 450 test images.
Real models (``--real ddddocr,nudenet``) come from ``bench/real`` (their own disjoint
calibration and evaluation inputs; they need that folder's extra packages).
Run: ``python bench/bench_prune.py [--real ddddocr,nudenet]``; writes
``bench/results/prune_thin.md``.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from bench.bench_data_aware import build as factorise  # noqa: E402
from bench.bench_data_aware import digits_case, run_all, worst_rel  # noqa: E402
from onnxlr import runtime  # noqa: E402
from onnxlr.activations import collect_layer_stats  # noqa: E402
from onnxlr.graph import to_graph, to_model  # noqa: E402
from onnxlr.io import load_model  # noqa: E402
from onnxlr.methods import METHODS, parse_method  # noqa: E402
from onnxlr.passes.factorize import FactorizeConfig  # noqa: E402
from onnxlr.passes.prune import ChannelPass, PrunePass  # noqa: E402
from onnxlr.passes.thin import ThinPass  # noqa: E402
from onnxlr.pipeline import prepare  # noqa: E402
from onnxlr.rank import RatioRank, parse_rank  # noqa: E402
from onnxlr.records import PRUNED, Declined  # noqa: E402
from onnxlr.sites import find_site  # noqa: E402

FRACTIONS = ("0.75", "0.5", "0.35")
VARIANTS = {  # name: (data-aware?, pass factory(config, calibration))
    "L1 + drop": (False, lambda c, d: ChannelPass(c, select="l1", reconstruct="slice",
                                                   unit="producer")),
    "thin + drop": (False, lambda c, d: ThinPass(c)),
    "L1 + LS": (True, lambda c, d: ChannelPass(c, calibration=d, select="l1", reconstruct="ls",
                                               unit="producer")),
    "thin + LS": (True, lambda c, d: ThinPass(c, calibration=d)),
    "prune": (True, lambda c, d: PrunePass(c, calibration=d)),
}


class Case:
    """A model, calibration inputs, held-out evaluation inputs, a task metric and/or agreement."""

    def __init__(self, name, title, model_path, calib, evaluate, timing, metric, score, agree,
                 agreement, notes):
        self.name, self.title, self.model_path = name, title, model_path
        self.calib, self.evaluate, self.timing = calib, evaluate, timing
        self.metric, self.score, self.agree, self.agreement = metric, score, agree, agreement
        self.notes = notes


def digits() -> Case:
    c = digits_case()
    acc = c.score
    return Case(c.name, c.title, c.model_path, [c.calib], c.evaluate,
                {"input": c.evaluate[0]["input"][:64]}, c.metric, acc, None, None,
                c.notes + ["timed at batch 64"])


def real(name: str, cache: Path, quick: bool) -> Case:
    t = importlib.import_module(f"bench.real.{name}").prepare(cache, quick=quick)
    return Case(t.name, t.title, Path(t.model_path), [t.calib], t.evaluate, t.timing, t.metric,
                t.score, t.agree, t.agreement, list(t.notes))


def candidate_macs(model) -> int:
    graph = to_graph(model)
    return sum(s.macs for n in graph.nodes if n.op in ("Conv", "Gemm", "MatMul")
               for s in [find_site(n, graph)] if not isinstance(s, Declined))


def factor_macs(prepared, ratio: float) -> int:
    """MACs of the candidate layers if ``--method auto --rank <ratio>`` factorised them
    (cost formulas only, the factorise pass's rule: a layer that would not save is kept)."""
    graph = to_graph(prepared)
    plan = parse_method("auto")
    total = 0
    for node in graph.nodes:
        site = find_site(node, graph) if node.op in ("Conv", "Gemm", "MatMul") else None
        if site is None or isinstance(site, Declined):
            continue
        method = METHODS[plan[site.kind]]()
        ranks = method.choose_ranks(site, RatioRank(ratio), 1)
        if isinstance(ranks, Declined):
            total += site.macs
            continue
        params, macs = method.cost(site, ranks)
        total += macs if params < site.params and macs < site.macs else site.macs
    return total


def matching_ratio(prepared, target: int) -> float:
    """The rank fraction whose factorised MACs come closest to ``target`` (bisection)."""
    lo, hi = 0.01, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if factor_macs(prepared, mid) <= target else (lo, mid)
    return min((lo, hi), key=lambda r: abs(factor_macs(prepared, r) - target))


def channel_variant(prepared, factory, fraction: str, calib):
    graph = to_graph(prepared)
    t0 = time.perf_counter()
    result = factory(FactorizeConfig(methods={}, rank=parse_rank(fraction)), calib)(graph)
    return to_model(graph, prepared), result.records, time.perf_counter() - t0


def evaluate(case: Case, model, ref, threads):
    out = run_all(runtime.make_session(model, threads=threads), case.evaluate)
    score = case.score(out) if case.score else None
    agree = case.agree(ref, out) if case.agree else None
    return worst_rel(ref, out), score, agree


def bench_case(case: Case, fractions, threads: int, max_positions: int) -> list[str]:
    model = load_model(str(case.model_path))
    # stored intermediate shapes can keep symbolic dims the pinned input no longer has
    # (nudenet's): without them shapes are re-inferred and MACs count every position
    del model.graph.value_info[:]
    prepared = prepare(model)
    base = runtime.make_session(prepared, threads=threads)
    ref = run_all(base, case.evaluate)
    macs0 = candidate_macs(prepared)
    t0 = time.perf_counter()
    stats = collect_layer_stats(prepared, case.calib, max_positions=max_positions)
    stats_s = time.perf_counter() - t0
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    base_score = case.score(ref) if case.score else None
    lines = [f"### {case.title}", ""] + [f"- {n}" for n in case.notes] + [
        f"- original {case.metric}: {fmt(base_score)}; MACs of the candidate layers: {macs0:,}",
        (f"- data-aware factorisation statistics: {stats_s:.1f} s (≤ {max_positions} conv "
         f"positions per sample)"), ""]
    head = ["keep", "variant", "data", "MACs", "out. rel. L2", case.metric]
    if case.agree:
        head.append(case.agreement)
    head += ["time s", "speed-up"]
    table = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    summary = []
    for fraction in fractions:
        rows, models = [], {}
        macs = set()
        for name, (aware, factory) in VARIANTS.items():
            model, records, secs = channel_variant(prepared, factory, fraction, case.calib)
            done = sum(r.status == PRUNED for r in records)
            m = candidate_macs(model)
            macs.add(m)
            err, score, agree = evaluate(case, model, ref, threads)
            rows.append([fraction, f"{name} ({done} units)", "yes" if aware else "no",
                         f"{m / macs0:.3f}x", f"{err:.4f}", fmt(score)]
                        + ([fmt(agree)] if case.agree else []) + [f"{secs:.1f}"])
            models[name] = (model, err, score, agree)
            print(" | ".join(rows[-1]), flush=True)
        if len(macs) != 1:
            print(f"warning: channel variants differ in MACs: {sorted(macs)}")
        target = min(macs)
        ratio = matching_ratio(prepared, target)
        for label, s in (("no", None), ("yes", stats)):
            model, records, secs = factorise(prepared, "auto", repr(round(ratio, 4)), s, 20.0)
            m = candidate_macs(model)
            err, score, agree = evaluate(case, model, ref, threads)
            rows.append([fraction, f"auto rank {ratio:.3f}", label, f"{m / macs0:.3f}x",
                         f"{err:.4f}", fmt(score)] + ([fmt(agree)] if case.agree else [])
                        + [f"{secs:.1f}"])
            models[f"auto {label}"] = (model, err, score, agree)
            print(" | ".join(rows[-1]), flush=True)
        # speed: original, a channel-pruned model (all channel variants share the
        # architecture), the data-aware factorisation; interleaved A/B/C
        timed = ["prune", "auto yes"]
        sessions = [base] + [runtime.make_session(models[k][0], threads=threads) for k in timed]
        lat = runtime.interleaved_latency(sessions, case.timing, warmup=5, iterations=40,
                                          max_seconds=60)
        speed = {"prune": lat.speedups[1], "auto yes": lat.speedups[2]}
        for row in rows:
            is_auto = row[1].startswith("auto")
            row.append(f"{speed['auto yes']:.2f}x" if is_auto and row[2] == "yes" else
                       "" if is_auto else f"{speed['prune']:.2f}x")
            table.append("| " + " | ".join(row) + " |")
        free = {k: v for k, v in models.items() if k in ("L1 + drop", "thin + drop", "auto no")}
        aware = {k: v for k, v in models.items() if k not in free}
        key = 2 if case.score else 3  # task metric, else agreement
        def best(d: dict, key: int = key):
            return max(d.items(), key=lambda kv: (kv[1][key] or 0, -kv[1][1]))

        bf, ba = best(free), best(aware)
        summary.append(f"- keep {fraction} (MACs {target / macs0:.3f}x): best data-free "
                       f"{bf[0]} {fmt(bf[1][key])} (error {bf[1][1]:.3f}); best data-aware "
                       f"{ba[0]} {fmt(ba[1][key])} (error {ba[1][1]:.3f})")
    note = ("Speed-up: ORT CPU, A/B/C interleaved with the original (median of per-round "
            "ratios); channel variants share one architecture, so one figure is given for them.")
    return lines + table + ["", note, ""] + summary + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", default="", help="comma list of bench/real tasks to add")
    parser.add_argument("--no-digits", action="store_true")
    parser.add_argument("--fractions", default=",".join(FRACTIONS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-positions", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="smaller real-model inputs")
    parser.add_argument("--cache", default=str(ROOT / "bench/.cache"))
    parser.add_argument("--out", default=str(ROOT / "bench/results/prune_thin.md"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    split = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    cases, failed = ([] if args.no_digits else [digits()]), []
    for name in split(args.real):
        try:
            cases.append(real(name, Path(args.cache), args.quick))
        except Exception as exc:  # noqa: BLE001 - a model that cannot be fetched is reported
            failed.append(f"- {name}: not run ({type(exc).__name__}: {str(exc).splitlines()[0]})")
    intro = ("Every channel chain keeps the same fraction of its channels in all five channel "
             "variants (same architecture, same MACs); `auto` factorisation at the rank fraction "
             "with the closest MACs. \"data\" = fitted on calibration inputs; errors and metrics "
             "on held-out inputs. No error bound, no back-off. "
             f"ORT CPU {args.threads} thread(s); {platform.machine()}, {os.cpu_count()} cores.")
    lines = ["## Channel pruning and thin layers (`python bench/bench_prune.py`)", "", intro, ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for case in cases:
        print(f"== {case.name}", flush=True)
        lines += bench_case(case, split(args.fractions), args.threads, args.max_positions)
        Path(args.out).write_text("\n".join(lines + failed) + "\n")  # each case as it ends
    lines += failed
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
