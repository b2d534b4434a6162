"""The bundled trained digits CNN (``examples/digits_cnn.onnx``) and its labelled test split.

Five 3×3/1×1 convs (BatchNorm folded by onnxlr) and two Gemms; 450 held-out
scikit-learn digits upsampled to 16×16 give the accuracy. Calibration is the
512 *training* images shipped as ``examples/digits_calib.npz`` (what a user of
the bundled example has), so no test image is seen before the metric is taken.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.real.base import Task, top1_accuracy, top1_agreement

NAME = "digits_cnn"
ROOT = Path(__file__).resolve().parents[2] / "examples"
OLD_CALIB = 64


def prepare(cache: Path, quick: bool = False) -> Task:
    with np.load(ROOT / "digits_test.npz") as data:
        # the first 64 test images were the calibration set of earlier runs: they stay out,
        # so every row of the results is measured on the same 386 images
        test_x, test_y = data["input"][OLD_CALIB:], data["label"][OLD_CALIB:]
    with np.load(ROOT / "digits_calib.npz") as data:
        calib, calib_y = data["input"], data["label"]
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
        agreement="top-1 agreement with the original", calib_labels=calib_y,
        labelled=lambda out, lab: top1_accuracy(out, lab, "logits"),
        notes=[f"calibration: the {len(calib)} training images of examples/digits_calib.npz; "
               f"metric on the {len(test_y)} test images; timed at batch 64"],
        info={"calib": int(len(calib)), "evaluate": int(len(test_y)), "timing_batch": 64})
