"""End-to-end check: the original and a candidate run on the same inputs in ONNX Runtime.

The original is run once; each candidate (the result, or the result with one
layer alone during back-off) is compared against those reference outputs.
When the inputs file also holds an integer array ``label`` (one per sample),
the accuracy of the first class-score output is reported for both models:
that is the task metric, next to the fidelity numbers.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx

from onnxlr import runtime

logger = logging.getLogger(__name__)


class Verifier:
    """Reference outputs of the original model, and comparisons against them."""

    def __init__(self, original: onnx.ModelProto, *, input_shapes=None, npz: str | None = None,
                 batch: int = 1, seed: int = 0, max_error: float | None = None,
                 provider: str = "cpu"):
        self.max_error = max_error
        self.provider = provider
        self.feeds = runtime.make_inputs(original, input_shapes, batch=batch, seed=seed, npz=npz)
        self.reference = runtime.run(runtime.make_session(original, provider=provider), self.feeds)
        shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in self.feeds.items())
        self.labels = _labels(npz) if npz else None
        self.description = (f"{'inputs from ' + npz if npz else f'seeded random inputs (seed {seed})'}"
                            f": {shapes}")

    def compare(self, candidate: onnx.ModelProto) -> runtime.Comparison:
        outputs = runtime.run(runtime.make_session(candidate, provider=self.provider), self.feeds)
        return runtime.compare_outputs(self.reference, outputs, self.max_error)

    def accuracy(self, outputs: dict[str, np.ndarray]) -> float | None:
        """Top-1 accuracy of the first [N, C] float output against ``label``, if both exist."""
        if self.labels is None:
            return None
        for value in outputs.values():
            if value.dtype.kind == "f" and value.ndim == 2 and value.shape[0] == len(self.labels):
                return float(np.mean(value.argmax(axis=1) == self.labels))
        return None

    def accuracies(self, candidate: onnx.ModelProto) -> tuple[float, float] | None:
        """(original, candidate) accuracy on the labelled inputs, or None without labels."""
        before = self.accuracy(self.reference)
        if before is None:
            return None
        outputs = runtime.run(runtime.make_session(candidate, provider=self.provider), self.feeds)
        return before, self.accuracy(outputs)


def _labels(npz: str) -> np.ndarray | None:
    with np.load(npz, allow_pickle=False) as data:
        if "label" in data.files and data["label"].dtype.kind in "iu" and data["label"].ndim == 1:
            return data["label"]
    return None
