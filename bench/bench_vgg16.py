"""VGG-16-shaped model at 224×224 (random He weights): what each method and rank rule does.

For each (method, rank) setting: params and MACs ratio, output error against the
original (ONNX Runtime, same seeded inputs), top-1 agreement, the tool's own run
time, and the ORT CPU latency ratio measured A B A B interleaved in one process.
Random weights have flat spectra: VBMF finds no low-rank signal in them, which is
the honest answer and is reported as such. Run: ``python bench/bench_vgg16.py``.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.models import vgg16  # noqa: E402
from onnxlr import runtime  # noqa: E402
from onnxlr.pipeline import optimize  # noqa: E402

SETTINGS = [("tucker", "vbmf"), ("tucker", "0.25"), ("cp", "0.25"), ("svd", "0.25"),
            ("auto", "0.25")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--rank-multiple", type=int, default=8)
    parser.add_argument("--cp-max-seconds", type=float, default=20.0)
    parser.add_argument("--out", default=str(Path(__file__).with_name("vgg16_results.md")))
    args = parser.parse_args()
    model = vgg16(batch=1, image=args.image)
    feeds = runtime.make_inputs(model, seed=1)
    base = runtime.make_session(model, threads=args.threads)
    reference = runtime.run(base, feeds)
    rows = []
    for method, rank in SETTINGS:
        t0 = time.perf_counter()
        result, report = optimize(model, method, rank, rank_multiple=args.rank_multiple,
                                  max_error=None, verify=False, cp_max_seconds=args.cp_max_seconds)
        seconds = time.perf_counter() - t0
        session = runtime.make_session(result, threads=args.threads)
        cmp = runtime.compare_outputs(reference, runtime.run(session, feeds))
        lat = runtime.interleaved_latency([base, session], feeds, warmup=2, iterations=args.rounds)
        macs = report.macs_after / report.macs_before
        speedup = lat.speedups[1]
        rows.append([method, rank, len(report.changed),
                     f"{report.params_after / report.params_before:.3f}", f"{macs:.3f}",
                     f"{1 / macs:.2f}", f"{speedup:.2f}", f"{speedup * macs:.2f}",
                     f"{cmp.outputs[0].rel_l2:.3f}", f"{cmp.outputs[0].cosine:.4f}",
                     f"{seconds:.0f}"])
        print(" | ".join(map(str, rows[-1])), flush=True)
    header = ["method", "rank", "layers", "params ratio", "MACs ratio", "MAC reduction",
              "speed-up (ORT CPU)", "efficiency", "output rel. L2", "cosine", "tool time s"]
    lines = [f"VGG-16 shape, {args.image}×{args.image}, batch 1, random He weights, "
             f"rank multiple {args.rank_multiple}; ORT CPU {args.threads} threads, "
             f"{args.rounds} interleaved rounds, median of per-round ratios; "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
