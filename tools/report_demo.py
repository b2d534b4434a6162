#!/usr/bin/env python3
"""Make the example reports (HTML, JSON, Markdown) from the bundled digits CNN.

    python tools/report_demo.py --out /tmp/onnxlr-demo
    python tools/report_demo.py --out /tmp/onnxlr-demo --accept latency  # + candidates, timings
    python tools/report_demo.py --out /tmp/onnxlr-demo --png               # + screenshot (Chromium)

Tucker-2 at rank 0.5 on every k×k conv, no error bound (``max_error=None``),
verified on the bundled test split (accuracy before/after), end-to-end latency
measured, and the per-layer profile (original vs result inside the whole model)
filled in with :func:`onnxlr.profiling.compare_profiles`. Not run by CI: it
times things on the machine it runs on.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxlr.io import load_model  # noqa: E402
from onnxlr.pipeline import optimize  # noqa: E402
from onnxlr.profiling import compare_profiles  # noqa: E402
from onnxlr.runtime import make_inputs  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="report-demo", help="output folder")
    ap.add_argument("--method", default="tucker")
    ap.add_argument("--rank", default="0.5")
    ap.add_argument("--accept", default="error", choices=("error", "latency"))
    ap.add_argument("--max-error", type=float, default=None, help="error bound (default none)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iterations", type=int, default=10, help="profiled runs per model")
    ap.add_argument("--png", action="store_true", help="screenshot the page (needs Chromium)")
    args = ap.parse_args()

    model_path, npz = ROOT / "examples" / "digits_cnn.onnx", ROOT / "examples" / "digits_test.npz"
    original = load_model(str(model_path))
    result, report = optimize(original, args.method, args.rank, max_error=args.max_error,
                              inputs=str(npz), accept=args.accept, threads=args.threads,
                              latency_cache=None)
    report.source = "examples/digits_cnn.onnx"
    feeds = make_inputs(original, npz=str(npz))
    report.profile = compare_profiles(original, result, feeds, threads=args.threads,
                                      iterations=args.iterations,
                                      layers=[r.name for r in report.records])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("report.html", report.to_html()), ("report.json", report.to_json()),
                       ("report.md", report.to_markdown())):
        (out / name).write_text(text, encoding="utf-8")
    print(report.to_text())
    print(f"wrote {out / 'report.html'}, report.json, report.md")
    if args.png:
        browser = next((b for b in ("chromium-headless-shell", "chromium", "google-chrome")
                       if shutil.which(b)), None)
        if browser is None:
            print("no Chromium found (apt-get install chromium-headless-shell)", file=sys.stderr)
            return 1
        subprocess.run([browser, "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        "--window-size=1200,3000", f"--screenshot={(out / 'report.png').resolve()}",
                        (out / "report.html").resolve().as_uri()],
                       check=True, capture_output=True, timeout=120)
        print(f"wrote {out / 'report.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
