"""Adaptive Fastfood vs truncated SVD at equal parameter count, on real FC layers.

For every Gemm/MatMul of each model (the bundled digits CNN and the real models of
``bench/real``), one layer at a time is replaced by

* ``fastfood``: Adaptive Fastfood (Yang et al., Deep Fried Convnets, arXiv 1412.7149),
  fitted after training by ``onnxlr.linalg.fastfood`` to the weights alone ("free") or to
  the layer's calibration input statistics ("data");
* ``svd``: truncated SVD with the parameter count closest to Fastfood's, free or data-aware
  (whitened, ``onnxlr.linalg.whiten``);
* ``fastfood+lr``: Fastfood plus a least-squares low-rank correction of the same rank as
  that SVD, against SVD at the parameter count of the pair (does the combination help?).

Reported per variant: parameters and MACs per input row (the methods' own counts), the
fit time, the layer's output error on held-out inputs (relative L2 against the original
layer, ``layer err``), the model's output error and task metric on held-out inputs with
only that layer replaced, and the layer's ONNX Runtime latency alone (CPU, fixed threads,
original / Fastfood (Kronecker radix 16) / Fastfood (butterflies) / SVD timed A B C D
interleaved in one process; median of per-round ratios to the original, so >1 is faster).
Fastfood's MACs are those of the default Kronecker stages (radix 16); the butterflies'
count is given with their timing.
No error bound, no back-off: the raw trade-off. Run::

    python bench/bench_fastfood.py                         # digits CNN
    python bench/bench_fastfood.py --real magika,ddddocr,sklearn_mlp
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnx_graphsurgeon as gs  # noqa: E402

from bench.bench_data_aware import Case, digits_case, real_case, worst_rel  # noqa: E402
from onnxlr import runtime  # noqa: E402
from onnxlr.activations import collect_layer_stats  # noqa: E402
from onnxlr.graph import NameScope, to_graph, to_model  # noqa: E402
from onnxlr.io import load_model  # noqa: E402
from onnxlr.latency import capture, isolate  # noqa: E402
from onnxlr.methods.fastfood import FastfoodMethod  # noqa: E402
from onnxlr.methods.svd import SvdMethod  # noqa: E402
from onnxlr.pipeline import prepare  # noqa: E402
from onnxlr.sites import LayerSite, find_site  # noqa: E402

BUTTERFLY_RADIX = 2


@dataclass
class Variant:
    label: str
    method: object
    ranks: tuple[int, ...]
    data: bool
    factors: object = None
    seconds: float = 0.0
    params: int = 0
    macs: int = 0
    row: dict = field(default_factory=dict)


def equal_rank(site: LayerSite, params: int) -> int:
    """SVD rank whose parameter count is closest to ``params`` (at least 1)."""
    m, n = site.matrix.shape
    bias = site.bias.size if site.bias is not None else 0
    return max(1, round((params - bias) / (m + n)))


def variants(site: LayerSite, sweeps: int) -> list[Variant]:
    ff = FastfoodMethod(sweeps=sweeps)
    k = equal_rank(site, ff.cost(site, (0,))[0])
    k2 = equal_rank(site, ff.cost(site, (k,))[0])
    full = min(site.matrix.shape)
    out = []
    for data in (False, True):
        tag = "data" if data else "free"
        out += [Variant(f"fastfood {tag}", ff, (0,), data),
                Variant(f"svd {tag}", SvdMethod(), (min(k, full),), data)]
    out += [Variant("fastfood+lr data", ff, (min(k, full),), True),
            Variant("svd data (pair)", SvdMethod(), (min(k2, full),), True)]
    return out


def replaced(model: onnx.ModelProto, node_name: str, variant: Variant, stats,
             graph: gs.Graph | None = None) -> onnx.ModelProto:
    """``model`` (or the one-node ``graph``) with one layer replaced by ``variant``."""
    g = graph if graph is not None else to_graph(model)
    node = next(n for n in g.nodes if n.name == node_name)
    site = find_site(node, g)
    if variant.factors is None:
        t0 = time.perf_counter()
        variant.factors = (variant.method.decompose(site, variant.ranks, stats=stats)
                           if variant.data else variant.method.decompose(site, variant.ranks))
        variant.seconds = time.perf_counter() - t0
        variant.params, variant.macs = variant.method.cost(site, variant.ranks)
    variant.method.build(g, site, variant.factors, NameScope(g))
    if graph is not None:
        g.cleanup().toposort()
        out = gs.export_onnx(g)
        out.ir_version = model.ir_version
        return out
    return to_model(g, model)


def layer_models(prepared: onnx.ModelProto, node_name: str, feeds: dict, chosen: list[Variant],
                 stats) -> tuple[list[onnx.ModelProto], dict]:
    """The layer alone (original first, then each variant) on its input captured on ``feeds``."""
    opsets = {o.domain: o.version for o in prepared.opset_import}

    def fresh():
        node = next(n for n in to_graph(prepared).nodes if n.name == node_name)
        values = capture(prepared, feeds, [t.name for t in node.inputs
                                           if isinstance(t, gs.Variable) and t.name])
        return isolate(node, values, opsets, prepared.ir_version)

    graph, layer_feeds = fresh()
    models = [gs.export_onnx(graph)]
    models[0].ir_version = prepared.ir_version
    for v in chosen:
        models.append(replaced(prepared, node_name, v, stats, graph=fresh()[0]))
    return models, layer_feeds


def slice_feeds(feeds: dict, rows: int) -> dict:
    return {k: v[:rows] for k, v in feeds.items()}


def run_chunked(session, feeds_list: list[dict], chunk: int) -> list[dict]:
    """Like ``run_all``, ``chunk`` samples per ORT run (memory), outputs joined per feed dict
    along their sample axis (the first axis as long as the chunk)."""
    out = []
    for feeds in feeds_list:
        total = len(next(iter(feeds.values())))
        parts = [runtime.run(session, {k: v[i:i + chunk] for k, v in feeds.items()})
                 for i in range(0, total, chunk)]
        sizes = [min(chunk, total - i) for i in range(0, total, chunk)]
        joined = {}
        for name in parts[0]:
            shape = parts[0][name].shape
            axis = next((a for a, n in enumerate(shape) if n == sizes[0]), 0)
            joined[name] = np.concatenate([p[name] for p in parts], axis=axis)
        out.append(joined)
    return out


def bench_layer(case: Case, prepared, site: LayerSite, stats, ref, threads: int, sweeps: int,
                rounds: int, batches: tuple[int, ...], chunk: int, max_rows: int):
    chosen = variants(site, sweeps)
    for v in chosen:  # whole model, this layer replaced: held-out error and task metric
        model = replaced(prepared, site.name, v, stats.get(site.name) if v.data else None)
        out = run_chunked(runtime.make_session(model, threads=threads), case.evaluate, chunk)
        v.row.update(model_err=worst_rel(ref, out),
                     score=case.score(out) if case.score else None)
    # rows (positions) the layer sees per sample bound how many samples it runs on alone
    _, one = layer_models(prepared, site.name, slice_feeds(case.evaluate[0], 1), [], stats)
    per_sample = max(1, int(np.prod(next(iter(one.values())).shape[:-1])))
    # the layer alone on held-out inputs: its own output error
    samples = max(1, 4 * max_rows // per_sample)
    models, feeds = layer_models(prepared, site.name, slice_feeds(case.evaluate[0], samples),
                                 chosen, stats)
    base = runtime.run(runtime.make_session(models[0], threads=threads), feeds)
    for v, m in zip(chosen, models[1:]):
        got = runtime.run(runtime.make_session(m, threads=threads), feeds)
        v.row["layer_err"] = runtime.compare_outputs(base, got).worst_rel_l2
    # latency: original, Fastfood butterflies, Fastfood Kronecker, SVD at equal params
    by = {v.label: v for v in chosen}
    ff, svd = by["fastfood data"], by["svd data"]
    bfly = Variant("fastfood data (butterflies)", FastfoodMethod(radix=BUTTERFLY_RADIX,
                                                                 sweeps=sweeps),
                   ff.ranks, True, factors=ff.factors)
    timing = {}
    for batch in batches:
        batch = max(1, min(batch, max_rows // per_sample))
        sample = slice_feeds(case.evaluate[0], batch)
        models, feeds = layer_models(prepared, site.name, sample, [ff, bfly, svd], stats)
        sessions = [runtime.make_session(m, threads=threads) for m in models]
        lat = runtime.interleaved_latency(sessions, feeds, warmup=5, iterations=rounds,
                                          max_seconds=20)
        rows = next(iter(feeds.values())).shape[0]
        timing[batch] = dict(rows=int(np.prod(next(iter(feeds.values())).shape[:-1])),
                             base_ms=lat.stats[0].median_ms, speedups=lat.speedups[1:],
                             spread=[(s.p10_ms, s.p90_ms) for s in lat.stats], batch=rows)
    bfly.params, bfly.macs = bfly.method.cost(site, bfly.ranks)
    return chosen, timing, bfly


def fmt(v, digits=4):
    return "-" if v is None else f"{v:.{digits}f}"


def bench_case(case: Case, threads: int, sweeps: int, rounds: int, batches, chunk: int,
               max_rows: int) -> tuple[list, list]:
    prepared = prepare(load_model(str(case.model_path)))
    graph = to_graph(prepared)
    sites = [s for s in (find_site(n, graph) for n in graph.nodes if n.op in ("Gemm", "MatMul"))
             if isinstance(s, LayerSite)]
    t0 = time.perf_counter()
    stats = collect_layer_stats(prepared, case.calib,
                                select=lambda s: s.kind in ("gemm", "matmul"))
    stats_s = time.perf_counter() - t0
    ref = run_chunked(runtime.make_session(prepared, threads=threads), case.evaluate, chunk)
    base_score = case.score(ref) if case.score else None
    lines = [f"### {case.title}", ""] + [f"- {n}" for n in case.notes] + [
        f"- FC layers: {len(sites)}; calibration statistics in {stats_s:.1f} s",
        f"- original {case.metric}: {fmt(base_score)}" if base_score is not None else
        "- no task labels: fidelity only", ""]
    summary = []
    for site in sites:
        d, n = site.matrix.shape
        print(f"== {case.name} {site.name} {d}->{n}", flush=True)
        chosen, timing, bfly = bench_layer(case, prepared, site, stats, ref, threads, sweeps,
                                           rounds, batches, chunk, max_rows)
        dense_params, dense_macs = site.params, site.macs // max(site.out_positions, 1)
        lines += [f"**{site.name}** ({site.kind}, {d}→{n}, {dense_params:,} params, "
                  f"{dense_macs:,} MACs per row)", ""]
        head = ["variant", "rank", "params", "MACs/row", "fit s", "layer err",
                "model out. err", case.metric]
        table = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for v in chosen:
            per_row = v.macs // max(site.out_positions, 1)
            table.append("| " + " | ".join([
                v.label, str(v.ranks[0]), f"{v.params:,} ({v.params / dense_params:.3f}x)",
                f"{per_row:,} ({per_row / dense_macs:.3f}x)", f"{v.seconds:.1f}",
                fmt(v.row["layer_err"]), fmt(v.row["model_err"]), fmt(v.row["score"])]) + " |")
            print(table[-1], flush=True)
        lines += table + [""]
        bfly_row = bfly.macs // max(site.out_positions, 1)
        lat = ["Layer alone, ORT CPU " f"{threads} thread(s), speed-up over the dense layer "
               f"(>1 faster): "]
        parts = []
        for batch, t in timing.items():
            s = t["speedups"]
            parts.append(f"{t['rows']} row(s) (dense {t['base_ms']:.3f} ms): fastfood "
                         f"{s[0]:.2f}x, fastfood butterflies {s[1]:.2f}x "
                         f"({bfly_row:,} MACs/row), svd {s[2]:.2f}x")
        lines += [lat[0] + "; ".join(parts) + ".", ""]
        by = {v.label: v for v in chosen}
        summary.append(dict(
            name=f"{case.name} {d}→{n}", dense_macs=dense_macs,
            ff=by["fastfood data"].row, svd=by["svd data"].row,
            ff_free=by["fastfood free"].row, svd_free=by["svd free"].row,
            ffl=by["fastfood+lr data"].row, svd2=by["svd data (pair)"].row,
            timing=timing, macs=(by["fastfood data"].macs // max(site.out_positions, 1),
                                 by["svd data"].macs // max(site.out_positions, 1))))
    return lines, summary


PIPELINE = [("fastfood", "fastfood", False), ("fastfood", "fastfood", True),
            ("svd (FC only)", "gemm=svd,matmul=svd", True)]


def pipeline_rows(case: Case, threads: int) -> list[str]:
    """``optimize`` end to end on the digits CNN's FC layers with the default 5% bound: what
    the back-off does with Fastfood (it grows the correction, or reverts the layer)."""
    from onnxlr.pipeline import optimize

    head = ["method", "calibration", "layer: status, rank, params, MACs", "logits rel. L2",
            "accuracy", "tool s"]
    rows = ["End to end (`onnxlr optimize --method ... --inputs examples/digits_test.npz`, "
            "default `--max-error 0.05`, back-off on), FC layers only:", "",
            "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, spec, calibrated in PIPELINE:
        t0 = time.perf_counter()
        _, report = optimize(str(case.model_path), method=spec,
                             inputs=str(ROOT / "examples/digits_test.npz"),
                             calib=[case.calib] if calibrated else None, threads=threads,
                             measure_latency=False, latency_cache=None)
        layers = "; ".join(
            f"{r.name.split('/')[-2]}: "
            + (f"rank {r.ranks[0]}, {r.params_after:,}/{r.params_before:,} params, "
               f"{r.macs_after:,}/{r.macs_before:,} MACs" if r.status == "factorised"
               else f"{r.status} ({r.reason.split(':')[0]})")
            for r in report.records if r.kind in ("gemm", "matmul"))
        acc = report.accuracy
        rows.append("| " + " | ".join([
            label, "yes" if calibrated else "no", layers,
            f"{report.comparison.worst_rel_l2:.4f}",
            f"{acc[0]:.4f} → {acc[1]:.4f}" if acc else "-",
            f"{time.perf_counter() - t0:.0f}"]) + " |")
        print(rows[-1], flush=True)
    return rows + [""]


def verdicts(summary: list[dict]) -> list[str]:
    """Where Fastfood wins and where it loses, counted layer by layer from the tables."""
    if not summary:
        return []
    total = len(summary)

    def better(a: str, b: str, key: str, higher: bool = False) -> list[str]:
        out = []
        for s in summary:
            x, y = s[a][key], s[b][key]
            if x is not None and y is not None and (x > y if higher else x < y):
                out.append(s["name"])
        return out

    def listed(names: list[str]) -> str:
        return f"{len(names)} of {total}" + (f" ({', '.join(names)})" if names else "")

    def speed(s, i):  # best speed-up over the dense layer at any timed batch
        return max(t["speedups"][i] for t in s["timing"].values())

    faster_dense = [f"{s['name']} {speed(s, 0):.2f}x" for s in summary if speed(s, 0) > 1]
    slower = [s["name"] for s in summary if speed(s, 0) < speed(s, 2)]
    over_dense = [s["name"] for s in summary if s["macs"][0] >= s["dense_macs"]]
    ratio = [s["macs"][0] / max(s["macs"][1], 1) for s in summary]
    return [
        f"Where Fastfood wins and loses, over the {total} FC layers above (held-out inputs; "
        "\"data\" fits):", "",
        f"- Layer output error at equal parameters: Fastfood lower than SVD on "
        f"{listed(better('ff', 'svd', 'layer_err'))}; weight-only fits: "
        f"{listed(better('ff_free', 'svd_free', 'layer_err'))}.",
        f"- Task metric at equal parameters: Fastfood higher on "
        f"{listed(better('ff', 'svd', 'score', higher=True))}.",
        f"- Fastfood + low-rank correction vs SVD at the pair's parameters: lower layer error "
        f"on {listed(better('ffl', 'svd2', 'layer_err'))}; higher task metric on "
        f"{listed(better('ffl', 'svd2', 'score', higher=True))}.",
        f"- MACs: Fastfood needs {min(ratio):.0f}–{max(ratio):.0f}× the MACs of SVD at equal "
        f"parameters, and at least the dense layer's on {listed(over_dense)} (the pipeline "
        "declines those: no saving).",
        f"- Speed (layer alone, ORT CPU): Fastfood faster than the dense layer on "
        f"{listed(faster_dense)}; slower than SVD at equal parameters on {listed(slower)}.",
        ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", default="", help="comma list of bench/real tasks to add")
    parser.add_argument("--no-digits", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sweeps", type=int, default=100, help="most ALS sweeps per fit")
    parser.add_argument("--rounds", type=int, default=200, help="interleaved timing rounds")
    parser.add_argument("--batches", default="1,64", help="samples per timed run")
    parser.add_argument("--chunk", type=int, default=32, help="samples per ORT run (memory)")
    parser.add_argument("--max-rows", type=int, default=16384,
                        help="most layer rows timed at once (4x that for the layer error)")
    parser.add_argument("--quick", action="store_true", help="smaller real-model inputs")
    parser.add_argument("--no-pipeline", action="store_true",
                        help="skip the end-to-end optimize rows on the digits CNN")
    parser.add_argument("--cache", default=str(ROOT / "bench/.cache"))
    parser.add_argument("--out", default=str(ROOT / "bench/results/fastfood.md"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    def split(text: str) -> list[str]:
        return [x for x in text.split(",") if x]

    cases = [] if args.no_digits else [digits_case()]
    failed = []
    for name in split(args.real):
        try:
            cases.append(real_case(name, Path(args.cache), args.quick))
        except Exception as exc:  # a model that cannot be fetched is reported, not fatal
            failed.append(f"- {name}: not run ({type(exc).__name__}: {str(exc).splitlines()[0]})")
    lines = ["## Adaptive Fastfood vs truncated SVD at equal parameters "
             "(`python bench/bench_fastfood.py`)", "",
             "One FC layer replaced at a time, no error bound. \"free\" = fitted to the weights "
             "(Frobenius norm); \"data\" = fitted to the layer's calibration input statistics. "
             "SVD's rank is the one whose parameter count is closest to Fastfood's; "
             "\"fastfood+lr\" adds a correction of that rank and is compared with SVD at the "
             "pair's parameter count. Errors and metrics on held-out inputs. "
             f"ORT CPU {args.threads} thread(s); {platform.machine()}, {os.cpu_count()} cores "
             "(shared, busy: ratios from interleaved runs only).", ""]
    summary = []
    batches = tuple(int(b) for b in split(args.batches))
    for case in cases:
        part, rows = bench_case(case, args.threads, args.sweeps, args.rounds, batches,
                                args.chunk, args.max_rows)
        lines += part
        summary += rows
        if case.name == "digits_cnn" and not args.no_pipeline:
            lines += pipeline_rows(case, args.threads)
    lines += verdicts(summary) + failed
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
