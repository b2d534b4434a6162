"""The bundled trained digits CNN (``examples/digits_cnn.onnx``) and its labelled test split.

Five 3×3/1×1 convs (BatchNorm folded by onnxlr) and two Gemms; 450 held-out
scikit-learn digits upsampled to 16×16. The first 64 samples are the
calibration set the error bound is checked on; the other 386 give accuracy.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.real.base import Task, top1_agreement

NAME = "digits_cnn"
ROOT = Path(__file__).resolve().parents[2] / "examples"
CALIB = 64


def prepare(cache: Path, quick: bool = False) -> Task:
    with np.load(ROOT / "digits_test.npz") as data:
        x, y = data["input"], data["label"]
    calib, test_x, test_y = x[:CALIB], x[CALIB:], y[CALIB:]
    if quick:
        test_x, test_y = test_x[:128], test_y[:128]

    def score(outputs: list[dict]) -> float:
        return float(np.mean(outputs[0]["logits"].argmax(1) == test_y))

    return Task(
        name=NAME, title="Bundled digits CNN (examples/digits_cnn.onnx)",
        source="examples/digits_cnn.onnx (this repository, trained by tools/train_digits_cnn.py)",
        model_path=ROOT / "digits_cnn.onnx", calib={"input": calib},
        evaluate=[{"input": test_x}], timing={"input": test_x[:64]}, metric="accuracy",
        score=score, agree=lambda r, c: top1_agreement(r, c, "logits"),
        agreement="top-1 agreement with the original",
        notes=[f"calibration: first {CALIB} of the 450 test images; metric on the other "
               f"{len(test_y)}; timed at batch 64"],
        info={"calib": CALIB, "evaluate": int(len(test_y)), "timing_batch": 64})
