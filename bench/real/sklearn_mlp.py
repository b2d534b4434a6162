"""A scikit-learn MLP trained on the digits data, converted with skl2onnx.

``Pipeline(StandardScaler, MLPClassifier(256, 128))`` trained on a seeded
split of ``sklearn.datasets.load_digits`` and converted with
``skl2onnx.to_onnx`` (ZipMap off). The graph mixes default-domain MatMuls (the
candidates) with ``ai.onnx.ml`` nodes (``Scaler`` and the label lookup), which
onnxlr must pass through untouched. Needs the ``bench`` extra (scikit-learn,
skl2onnx); the model is built once into the cache.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.real.base import Task, top1_agreement

NAME = "sklearn_mlp"
SEED = 0
CALIB = 64


def _split():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    x, y = load_digits(return_X_y=True)
    return train_test_split(x.astype(np.float32), y, test_size=0.3, random_state=SEED, stratify=y)


def build(path: Path) -> Path:
    """Train and convert the MLP (seeded; about 10 s on two cores)."""
    import sklearn
    import skl2onnx
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    x_train, _, y_train, _ = _split()
    clf = make_pipeline(StandardScaler(), MLPClassifier((256, 128), max_iter=300, random_state=SEED))
    clf.fit(x_train, y_train)
    onx = skl2onnx.to_onnx(clf, x_train[:1], options={id(clf.steps[-1][1]): {"zipmap": False}},
                           target_opset={"": 17, "ai.onnx.ml": 3})
    onx.doc_string = f"scikit-learn {sklearn.__version__}, skl2onnx {skl2onnx.__version__}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(onx.SerializeToString())
    return path


def prepare(cache: Path, quick: bool = False) -> Task:
    import sklearn
    path = cache / NAME / f"mlp_digits_sklearn{sklearn.__version__}.onnx"
    if not path.exists():
        build(path)
    x_train, x_test, y_train, y_test = _split()
    # calibration: 512 training digits (what a user has); the first CALIB test digits, the
    # calibration set of earlier runs, stay out so every row is measured on the same digits
    pick = np.sort(np.random.default_rng(SEED).choice(len(x_train), min(512, len(x_train)),
                                                      replace=False))
    calib, test_x, test_y = x_train[pick], x_test[CALIB:], y_test[CALIB:]
    calib_y = y_train[pick]

    def score(outputs: list[dict]) -> float:
        return float(np.mean(outputs[0]["label"] == test_y))

    return Task(
        name=NAME, title="scikit-learn MLP on digits (skl2onnx, with ai.onnx.ml nodes)",
        source=f"trained here: scikit-learn {sklearn.__version__} MLPClassifier(256, 128), seed "
               f"{SEED}, converted by skl2onnx (BSD-3-Clause / Apache-2.0)",
        model_path=path, calib={"X": calib}, evaluate=[{"X": test_x}], timing={"X": test_x[:64]},
        metric="accuracy", score=score, agree=lambda r, c: top1_agreement(r, c, "probabilities"),
        agreement="top-1 agreement with the original", calib_labels=calib_y,
        labelled=lambda out, lab: float(np.mean(out["label"] == lab)),
        notes=[f"70/30 stratified split (seed {SEED}); calibration: {len(calib)} training digits, "
               f"metric on the other {len(test_y)}; timed at batch 64"],
        info={"calib": int(len(calib)), "evaluate": int(len(test_y)), "timing_batch": 64})
