"""End-to-end check: the original and a candidate run on the same inputs in ONNX Runtime.

The original is run once; each candidate (the result, or the result with one
layer alone during back-off) is compared against those reference outputs.
When the inputs file also holds an integer array ``label`` (one per sample),
the accuracy of the first class-score output is reported for both models:
that is the task metric, next to the fidelity numbers.
"""
from __future__ import annotations

import logging
import os
import tempfile

import numpy as np
import onnx

from onnxlr import runtime, validate
from onnxlr.runtime import check_reference
from onnxlr.errors import OnnxlrError

logger = logging.getLogger(__name__)


#: Models above this many bytes reach ONNX Runtime through a temporary file with external data
#: (ORT cannot take a serialised model over protobuf's 2 GiB limit).
SESSION_BYTES_LIMIT = 2**31 - 1 - 2**24


class VerificationUnavailable(OnnxlrError):
    """ONNX Runtime cannot run the *original* model (an op or dtype it lacks): nothing was
    compared. The pipeline may go on unverified when no bound was asked for."""


def session(model: onnx.ModelProto, provider: str = "cpu"):
    """An ORT session for ``model``; over ~2 GB it goes through a temporary external-data file."""
    if validate.model_bytes(model) <= SESSION_BYTES_LIMIT:
        return runtime.make_session(model, provider=provider)
    from onnxlr.io import save_model
    with tempfile.TemporaryDirectory(prefix="onnxlr-verify-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        save_model(model, path, external_data=True)
        return runtime.make_session(path, provider=provider)  # ORT has read the data by now


#: Input types onnxruntime's Python API cannot be fed as numpy arrays.
_UNFEEDABLE = {onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT8E4M3FN,
               onnx.TensorProto.FLOAT8E4M3FNUZ, onnx.TensorProto.FLOAT8E5M2,
               onnx.TensorProto.FLOAT8E5M2FNUZ}


def _unavailable(reason: str) -> VerificationUnavailable:
    return VerificationUnavailable(
        f"verification could not run: {reason}; the result cannot be checked against the "
        f"original here (to write it unverified: --no-verify --max-error none)")


def _check_feedable(model: onnx.ModelProto) -> None:
    inits = {t.name for t in model.graph.initializer}
    for v in model.graph.input:
        elem = v.type.tensor_type.elem_type if v.type.HasField("tensor_type") else None
        if v.name not in inits and elem in _UNFEEDABLE:
            raise _unavailable(f"input {v.name!r} is {onnx.TensorProto.DataType.Name(elem)}, "
                               f"which onnxruntime's Python API cannot be fed")


class Verifier:
    """Reference outputs of the original model, and comparisons against them.

    Raises:
        VerificationUnavailable: ONNX Runtime cannot load or run the original
            (a custom-domain op, bf16 kernels the provider lacks, ...).
    """

    def __init__(self, original: onnx.ModelProto, *, input_shapes=None, npz: str | None = None,
                 batch: int = 1, seed: int = 0, max_error: float | None = None,
                 provider: str = "cpu"):
        self.max_error = max_error
        self.provider = provider
        _check_feedable(original)
        notes: list[str] = []
        self.feeds = runtime.make_inputs(original, input_shapes, batch=batch, seed=seed, npz=npz,
                                         notes=notes)
        try:
            self.reference = runtime.run(session(original, provider), self.feeds)
        except VerificationUnavailable:
            raise
        except OnnxlrError as exc:
            raise _unavailable(str(exc)) from None
        source = npz or f"random inputs (batch {batch})"
        try:  # outputs that are empty or all NaN would score any candidate as error 0
            check_reference(self.reference)
        except OnnxlrError as exc:
            raise OnnxlrError(f"{source}: {exc}") from None
        shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in self.feeds.items())
        self.labels = _labels(npz) if npz else None
        self.description = (f"{'inputs from ' + npz if npz else f'seeded random inputs (seed {seed})'}"
                            f": {shapes}" + "".join(f"; {n}" for n in notes))

    def compare(self, candidate: onnx.ModelProto) -> runtime.Comparison:
        outputs = runtime.run(session(candidate, self.provider), self.feeds)
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
        outputs = runtime.run(session(candidate, self.provider), self.feeds)
        return before, self.accuracy(outputs)


def _labels(npz: str) -> np.ndarray | None:
    from onnxlr.arrays import load_npz
    label = load_npz(npz, "inputs file").get("label")
    if label is not None and label.dtype.kind in "iu" and label.ndim == 1:
        return label
    return None
