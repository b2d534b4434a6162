"""VGG-16- and ResNet-50-shaped models at 224×224: FLOPs against measured ORT speed.

For each (model, method, rank, acceptance) setting the model is optimised once
(the tool's own run time is recorded), then original and result are timed side
by side (A B A B interleaved, median of per-round ratios) at batch 1 and batch
8 on ONNX Runtime's CPU provider with fixed threads. Efficiency = speed-up ÷
MAC reduction. Random He weights: output errors mean nothing here (flat
spectra), so no error bound is applied; this measures speed, not accuracy.
``--accept latency`` rows show the latency-aware mode (layers timed alone at
batch 1, kept only if faster; never slower end to end).
Rows are appended to ``bench/results/latency_cnn.md`` as they finish.
Run: ``python bench/bench_latency.py [--models vgg16,resnet50] [--quick]``.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.models import resnet50, vgg16  # noqa: E402
from onnxlr import runtime  # noqa: E402
from onnxlr.pipeline import optimize  # noqa: E402

SETTINGS = {
    "vgg16": [("tucker", "0.25", "error"), ("cp", "0.25", "error"), ("svd", "0.25", "error"),
              ("auto", "0.25", "latency")],
    "resnet50": [("auto", "0.5", "error"), ("auto", "0.25", "error"),
                 ("auto", "0.25", "latency")],
}
BUILDERS = {"vgg16": vgg16, "resnet50": resnet50}
HEADER = ["model", "method", "rank", "accept", "layers", "params ratio", "MACs ratio",
          "MAC reduction", "speed-up b1", "eff. b1", "speed-up b8", "eff. b8", "tool time s"]


def machine() -> str:
    import onnxruntime
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, onnxruntime {onnxruntime.__version__}"


def speedup(original, result, batch: int, threads: int, rounds: int) -> float:
    feeds = runtime.make_inputs(original, batch=batch, seed=1)
    sessions = [runtime.make_session(m, threads=threads) for m in (original, result)]
    return runtime.interleaved_latency(sessions, feeds, warmup=2, iterations=rounds).speedups[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vgg16,resnet50")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--append", action="store_true",
                        help="add rows to an existing --out table instead of starting it")
    parser.add_argument("--skip", default="",
                        help="comma list of model:method:rank:accept settings already measured")
    parser.add_argument("--quick", action="store_true", help="64×64 images, 5 rounds")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "latency_cnn.md"))
    args = parser.parse_args()
    image, rounds = (64, 5) if args.quick else (args.image, args.rounds)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"## Latency: VGG-16 / ResNet-50 shapes, {image}×{image}, random He weights "
             f"(`python bench/bench_latency.py`)", "",
             f"{machine()}; ORT CPU provider, {args.threads} threads, {rounds} interleaved "
             f"rounds per batch size, median of per-round ratios; rank multiple 8; no error "
             f"bound (random weights). Measured while other jobs shared the machine.", "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    if args.append and out.is_file():
        lines = out.read_text().rstrip("\n").splitlines()
    out.write_text("\n".join(lines) + "\n")
    skip = set(filter(None, args.skip.split(",")))
    for name in args.models.split(","):
        model = BUILDERS[name](batch="N", image=image)
        for method, rank, accept in SETTINGS[name]:
            if f"{name}:{method}:{rank}:{accept}" in skip:
                continue
            t0 = time.perf_counter()
            result, report = optimize(model, method, rank, rank_multiple=8, max_error=None,
                                      verify=accept == "latency", accept=accept,
                                      measure_latency=False, threads=args.threads,
                                      cp_max_seconds=20.0)
            seconds = time.perf_counter() - t0
            macs = report.macs_after / report.macs_before
            s1 = speedup(model, result, 1, args.threads, rounds)
            s8 = speedup(model, result, 8, args.threads, max(3, rounds // 2))
            row = [name, method, rank, accept, len(report.changed),
                   f"{report.params_after / report.params_before:.3f}", f"{macs:.3f}",
                   f"{1 / macs:.2f}", f"{s1:.2f}", f"{s1 * macs:.2f}", f"{s8:.2f}",
                   f"{s8 * macs:.2f}", f"{seconds:.0f}"]
            lines.append("| " + " | ".join(map(str, row)) + " |")
            out.write_text("\n".join(lines) + "\n")
            print(lines[-1], flush=True)


if __name__ == "__main__":
    main()
