"""End-to-end check: the original and a candidate run on the same inputs in ONNX Runtime.

The original is run once; each candidate (the result, or the result with one
layer alone during back-off) is compared against those reference outputs.
"""
from __future__ import annotations

import logging

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
        self.description = (f"{'inputs from ' + npz if npz else f'seeded random inputs (seed {seed})'}"
                            f": {shapes}")

    def compare(self, candidate: onnx.ModelProto) -> runtime.Comparison:
        outputs = runtime.run(runtime.make_session(candidate, provider=self.provider), self.feeds)
        return runtime.compare_outputs(self.reference, outputs, self.max_error)
