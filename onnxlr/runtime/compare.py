"""Comparing a candidate's outputs with the reference's: errors, cosine, top-1 agreement.

A comparison is an object (after Polygraphy's ``comparator``): it carries every output's
numbers, and ``bool(comparison)`` says whether the bound held.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from onnxlr.errors import OnnxlrError


@dataclass
class OutputComparison:
    """Error of one candidate output against the reference.

    For float outputs ``rel_l2 = ||a-b|| / ||a||`` (float64; the plain ``||b||``
    when the reference is all zeros), ``cosine`` of the flattened arrays (1.0
    when both are zero, 0.0 when one is) and ``max_abs = max|a-b|``; any
    non-finite mismatch gives ``inf`` errors and cosine 0.0. For non-float
    outputs (labels, strings) ``rel_l2`` is the fraction of mismatching
    elements, ``cosine = 1 - rel_l2`` and ``max_abs`` is ``max|a-b|`` (1.0/0.0
    for strings). ``top1_agreement`` is the fraction of rows with the same
    argmax, only for float outputs shaped like class scores ``[N, C]``, C > 1
    (size-1 dims after the first are ignored); otherwise ``None``.
    """

    name: str
    rel_l2: float
    max_abs: float
    cosine: float
    top1_agreement: float | None


@dataclass
class Comparison:
    """Per-output errors and the bound (``max_error``) they were checked against."""

    outputs: list[OutputComparison]
    max_error: float | None

    @property
    def worst_rel_l2(self) -> float:
        """Largest ``rel_l2`` over the outputs (0.0 when there are none)."""
        return max((o.rel_l2 for o in self.outputs), default=0.0)

    def __bool__(self) -> bool:
        """True when there is no bound or every output's ``rel_l2`` is within it (NaN fails)."""
        if self.max_error is None:
            return True
        return all(o.rel_l2 <= self.max_error for o in self.outputs)

    def to_dict(self) -> dict:
        """JSON-ready dict (floats may be ``inf``)."""
        return {"max_error": self.max_error, "worst_rel_l2": self.worst_rel_l2, "passed": bool(self),
                "outputs": [asdict(o) for o in self.outputs]}


def class_rows(a: np.ndarray) -> np.ndarray | None:
    """A float output shaped like class scores as [N, C] (C > 1, size-1 dims ignored), else None."""
    a = np.asarray(a)
    if a.dtype.kind != "f" or a.ndim < 2:
        return None
    rest = [d for d in a.shape[1:] if d != 1]
    if len(rest) != 1 or rest[0] < 2:
        return None
    return a.reshape(a.shape[0], rest[0])


def _compare_one(name: str, a: np.ndarray, b: np.ndarray) -> OutputComparison:
    if a.dtype.kind != "f" or b.dtype.kind != "f":
        mismatch = a != b
        frac = float(np.mean(mismatch)) if a.size else 0.0
        if a.dtype.kind in "biuf" and b.dtype.kind in "biuf":
            max_abs = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)), initial=0.0))
        else:
            max_abs = float(bool(np.any(mismatch)))
        return OutputComparison(name, frac, max_abs, 1.0 - frac, None)
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    rows_a, rows_b = class_rows(a), class_rows(b)
    top1 = None
    if rows_a is not None and rows_b is not None and rows_a.shape[0] > 0:
        top1 = float(np.mean(np.argmax(rows_a, axis=1) == np.argmax(rows_b, axis=1)))
    if not (np.all(np.isfinite(a64)) and np.all(np.isfinite(b64))):
        if np.array_equal(a64, b64, equal_nan=True):
            return OutputComparison(name, 0.0, 0.0, 1.0, top1)
        return OutputComparison(name, math.inf, math.inf, 0.0, top1)
    diff = a64 - b64
    na, nb, nd = (float(np.linalg.norm(x)) for x in (a64, b64, diff))
    rel = nd / na if na > 0 else nd
    if na == 0 or nb == 0:
        cosine = 1.0 if na == nb else 0.0
    else:
        cosine = float(np.dot(a64, b64)) / (na * nb)
    max_abs = float(np.max(np.abs(diff), initial=0.0))
    return OutputComparison(name, rel, max_abs, min(1.0, max(-1.0, cosine)), top1)


def compare_outputs(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray],
                    max_error: float | None = None) -> Comparison:
    """Compare every reference output with the candidate's output of the same name.

    Args:
        reference: outputs of the original model (from :func:`run`).
        candidate: outputs of the factorised model.
        max_error: bound on each output's ``rel_l2``; ``None`` checks nothing.

    Raises:
        OnnxlrError: the candidate lacks an output or its shape differs.
    """
    outputs = []
    for name, ref in reference.items():
        if name not in candidate:
            raise OnnxlrError(f"candidate model has no output {name!r} "
                              f"(it has {', '.join(candidate) or 'none'})")
        a, b = np.asarray(ref), np.asarray(candidate[name])
        if a.shape != b.shape:
            raise OnnxlrError(f"output {name!r} has shape {b.shape} in the candidate "
                              f"but {a.shape} in the reference")
        outputs.append(_compare_one(name, a, b))
    return Comparison(outputs, max_error)


def check_reference(reference: dict[str, np.ndarray]) -> None:
    """A check that sees no finite, non-empty output checks nothing: refuse it loudly.

    Raises:
        OnnxlrError: no outputs, an empty one, or a float one without a finite value.
    """
    if not reference:
        raise OnnxlrError("the original model produced no outputs on the verification inputs")
    for name, value in reference.items():
        value = np.asarray(value)
        if value.size == 0:
            raise OnnxlrError(f"output {name!r} of the original is empty on the verification "
                              f"inputs (batch 0?): nothing could be checked")
        if value.dtype.kind == "f" and not np.any(np.isfinite(value)):
            raise OnnxlrError(f"output {name!r} of the original has no finite value on the "
                              f"verification inputs (NaN inputs?): nothing could be checked")
