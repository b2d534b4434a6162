"""Data-free vs data-aware factorisation at equal MACs: output error and task accuracy.

For each model, method (svd, tucker, cp, auto) and rank fraction (a ``--rank``
ratio gives the same ranks with and without data, hence the same MACs), the
model is factorised twice, weights only and with the layers' calibration
statistics (``onnxlr.activations``: whitened SVD, Tucker/CP refit), and both
run in ONNX Runtime on held-out inputs next to the original. A second table
runs a spectrum rule (``energy:F``) both ways: there the ranks differ (the
data-aware rule reads the whitened spectrum, i.e. output energy), so MACs are
shown next to the errors. No error bound, no back-off: raw effect of the data.

Digits CNN: calibration = the scikit-learn digits *train* split (1347 images,
``bench/data/digits_train_8x8.npz``: the raw 8×8 images and labels of
``tools/train_digits_cnn.py``'s split, upsampled here in numpy exactly as the
training script does with torch: max abs difference 0.0 on the test split);
evaluation = ``examples/digits_test.npz`` (450 test images, never seen).
Real models (``--real magika,...``) come from ``bench/real`` (their own disjoint
calibration and evaluation inputs). Run: ``python bench/bench_data_aware.py``.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from onnxlr import runtime  # noqa: E402
from onnxlr.activations import collect_layer_stats  # noqa: E402
from onnxlr.graph import to_graph, to_model  # noqa: E402
from onnxlr.io import load_model  # noqa: E402
from onnxlr.methods import parse_method  # noqa: E402
from onnxlr.passes.factorize import Factorize, FactorizeConfig  # noqa: E402
from onnxlr.pipeline import prepare  # noqa: E402
from onnxlr.rank import parse_rank  # noqa: E402

RATIOS = ("0.5", "0.35", "0.25")
ENERGIES = ("energy:0.9", "energy:0.97")
METHODS = ("svd", "tucker", "cp", "auto")


def upsample(images: np.ndarray, size: int = 16) -> np.ndarray:
    """torch ``F.interpolate(mode="bilinear", align_corners=False)`` of [N, 1, h, w], in numpy."""
    h, w = images.shape[2:]

    def axis(n_in: int):
        src = np.maximum((np.arange(size) + 0.5) * n_in / size - 0.5, 0)
        i0 = np.floor(src).astype(int)
        return i0, np.minimum(i0 + 1, n_in - 1), (src - i0).astype(np.float32)

    y0, y1, ly = axis(h)
    x0, x1, lx = axis(w)
    rows = lambda y: images[:, :, y][:, :, :, x0] * (1 - lx) + images[:, :, y][:, :, :, x1] * lx
    return (rows(y0) * (1 - ly)[:, None] + rows(y1) * ly[:, None]).astype(np.float32)


@dataclass
class Case:
    """A model with calibration inputs and held-out evaluation inputs with a task score."""

    name: str
    title: str
    model_path: Path
    calib: object                      # anything onnxlr.calib.load_calibration accepts
    evaluate: list[dict]
    score: Callable[[list[dict]], float] | None
    metric: str
    notes: list[str]
    agree: Callable[[list[dict], list[dict]], float] | None = None
    agreement: str = ""


def digits_case() -> Case:
    with np.load(ROOT / "bench/data/digits_train_8x8.npz") as d:
        train = upsample(d["images"].astype(np.float32)[:, None] / 16.0)
    with np.load(ROOT / "examples/digits_test.npz") as d:
        test_x, test_y = d["input"], d["label"]
    return Case("digits_cnn", "Bundled digits CNN (examples/digits_cnn.onnx)",
                ROOT / "examples/digits_cnn.onnx", {"input": train}, [{"input": test_x}],
                lambda outs: float(np.mean(outs[0]["logits"].argmax(1) == test_y)), "accuracy",
                [f"calibration: the {len(train)} training images (train split of "
                 f"tools/train_digits_cnn.py); evaluation: the {len(test_y)} test images"])





def real_case(name: str, cache: Path, quick: bool) -> Case:
    task = importlib.import_module(f"bench.real.{name}").prepare(cache, quick=quick)
    return Case(task.name, task.title, Path(task.model_path), [task.calib], task.evaluate,
                task.score, task.metric, list(task.notes), task.agree, task.agreement)


def run_all(session, feeds_list: list[dict]) -> list[dict]:
    return [runtime.run(session, f) for f in feeds_list]


def worst_rel(ref: list[dict], out: list[dict]) -> float:
    """Worst relative L2 error over float outputs, all evaluation batches together."""
    worst = 0.0
    for name in ref[0]:
        a = np.concatenate([r[name].reshape(-1) for r in ref]).astype(np.float64)
        if a.dtype.kind != "f" or ref[0][name].dtype.kind != "f":
            continue
        b = np.concatenate([o[name].reshape(-1) for o in out]).astype(np.float64)
        worst = max(worst, float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30)))
    return worst


def build(prepared, method: str, rank: str, stats, cp_seconds: float):
    config = FactorizeConfig(methods=parse_method(method), rank=parse_rank(rank),
                             cp_max_seconds=cp_seconds, calibration=stats)
    graph = to_graph(prepared)
    t0 = time.perf_counter()
    records = Factorize(config)(graph).records
    return to_model(graph, prepared), records, time.perf_counter() - t0


def bench_case(case: Case, methods, ratios, energies, max_positions, cp_seconds, threads) -> list[str]:
    prepared = prepare(load_model(str(case.model_path)))
    t0 = time.perf_counter()
    stats = collect_layer_stats(prepared, case.calib, max_positions=max_positions)
    stats_s = time.perf_counter() - t0
    base = runtime.make_session(prepared, threads=threads)
    ref = run_all(base, case.evaluate)
    base_score = case.score(ref) if case.score else None
    metric = case.metric if case.score else "agreement"
    lines = [f"### {case.title}", ""] + [f"- {n}" for n in case.notes] + [
        f"- layer statistics: {len(stats)} layers in {stats_s:.1f} s "
        f"(conv patches at ≤ {max_positions} positions per sample)",
        f"- original {case.metric}: {base_score:.4f}" if base_score is not None else
        f"- no task labels: \"agreement\" is the {case.agreement}", ""]
    head = ["method", "rank", "layers", "MACs (cand.)", "out. rel. L2 free", "out. rel. L2 data",
            f"{metric} free", f"{metric} data", "time s free / data"]
    table = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    energy_head = ["method", "rank", "MACs free", "MACs data", "out. rel. L2 free",
                   "out. rel. L2 data", f"{metric} free", f"{metric} data"]
    energy_table = ["| " + " | ".join(energy_head) + " |", "|" + "---|" * len(energy_head)]
    macs_before = None
    for method in methods:
        for rank in list(ratios) + list(energies):
            row = {}
            for label, s in (("free", None), ("data", stats)):
                model, records, secs = build(prepared, method, rank, s, cp_seconds)
                out = run_all(runtime.make_session(model, threads=threads), case.evaluate)
                done = [r for r in records if r.status == "factorised"]
                cand = [r for r in records if r.kind]
                macs_before = sum(r.macs_before for r in cand)
                score = case.score(out) if case.score else case.agree(ref, out)
                row[label] = dict(err=worst_rel(ref, out), score=score,
                                  macs=sum(r.macs_after for r in cand) / max(macs_before, 1),
                                  layers=len(done), secs=secs,
                                  ranks=[r.ranks for r in done])
            f, d = row["free"], row["data"]
            fmt = lambda v: "-" if v is None else f"{v:.4f}"
            if rank.startswith("energy"):
                cells = [method, rank, f"{f['macs']:.3f}x", f"{d['macs']:.3f}x", f"{f['err']:.4f}",
                         f"{d['err']:.4f}", fmt(f["score"]), fmt(d["score"])]
                energy_table.append("| " + " | ".join(cells) + " |")
            else:
                assert f["ranks"] == d["ranks"], (f["ranks"], d["ranks"])  # equal MACs
                cells = [method, rank, str(f["layers"]), f"{f['macs']:.3f}x", f"{f['err']:.4f}",
                         f"{d['err']:.4f}", fmt(f["score"]), fmt(d["score"]),
                         f"{f['secs']:.1f} / {d['secs']:.1f}"]
                table.append("| " + " | ".join(cells) + " |")
            print(" | ".join(cells), flush=True)
    lines += [f"Equal ranks (same MACs; MACs of the candidate layers, {macs_before:,} before):",
              ""] + table + [""]
    if energies:
        lines += ["Spectrum rule applied to the weight spectrum (free) or the whitened, "
                  "output-energy spectrum (data): ranks differ.", ""] + energy_table + [""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", default="", help="comma list of bench/real tasks to add")
    parser.add_argument("--no-digits", action="store_true")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--ratios", default=",".join(RATIOS))
    parser.add_argument("--energies", default=",".join(ENERGIES))
    parser.add_argument("--max-positions", type=int, default=64)
    parser.add_argument("--cp-max-seconds", type=float, default=20.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="smaller real-model inputs")
    parser.add_argument("--cache", default=str(ROOT / "bench/.cache"))
    parser.add_argument("--out", default=str(ROOT / "bench/results/data_aware.md"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    split = lambda s: [x for x in s.split(",") if x]
    cases = [] if args.no_digits else [digits_case()]
    failed = []
    for name in split(args.real):
        try:
            cases.append(real_case(name, Path(args.cache), args.quick))
        except Exception as exc:  # a model that cannot be fetched is reported, not fatal
            failed.append(f"- {name}: not run ({type(exc).__name__}: {str(exc).splitlines()[0]})")
    lines = ["## Data-aware vs data-free factorisation (`python bench/bench_data_aware.py`)", "",
             "Same ranks with and without calibration data (a rank *fraction*), so equal MACs; "
             "output error and task metric on held-out inputs never used for calibration. "
             "No error bound or back-off. \"free\" = weights only; \"data\" = whitened SVD "
             "(`onnxlr.linalg.whiten`) and least-squares refit of Tucker/CP's last stage. "
             f"ORT CPU {args.threads} thread(s); {platform.machine()}, {os.cpu_count()} cores.", ""]
    for case in cases:
        print(f"== {case.name}", flush=True)
        lines += bench_case(case, split(args.methods), split(args.ratios), split(args.energies),
                            args.max_positions, args.cp_max_seconds, args.threads)
    lines += failed
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
