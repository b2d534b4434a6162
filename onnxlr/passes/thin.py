"""Thin layers (Lu et al., "Fully-adaptive Feature Sharing in Multi-Task Networks",
CVPR 2017, arXiv 1611.05377, §3.2).

A layer keeps d' of its d output rows (neurons, conv filters), chosen by
simultaneous orthogonal matching pursuit so that every row is close to a
combination of the kept ones (:func:`onnxlr.linalg.somp.somp`); the next layer
keeps the matching input columns. The unit is the *producer*: ``--rank 0.5``
keeps half of a layer's outputs.

Data-free by default, as in the paper: the next layer's columns are dropped.
When nothing non-linear lies between the two layers (an empty or Identity/Dropout
chain), the dropped outputs are exactly ``A·kept + d`` with SOMP's coefficients,
so the next layer absorbs them: ``W'_kept = W_kept + W_dropped A`` and its bias
gains ``W_dropped d`` — exact for Gemm/MatMul/1×1 consumers, exact away from the
zero-padded border for k×k convs. With calibration data (``--calib``) the next
layer is refit by least squares on its real input instead (the same refit as
channel pruning, :func:`onnxlr.linalg.channel_select.refit`).

The channel chains, rewrite and bookkeeping are shared with channel pruning
(:mod:`onnxlr.passes.prune`).
"""
from __future__ import annotations

from onnxlr.passes.prune import ChannelPass


class ThinPass(ChannelPass):
    """SOMP row selection; least-squares compensation of the next layer when data is given."""

    name = "thin"
    method = "thin"

    def __init__(self, config, keep=None, cache=None, progress=None, *, calibration=None, **kw):
        kw.setdefault("select", "somp")
        kw.setdefault("reconstruct", "ls" if calibration is not None else "slice")
        kw.setdefault("unit", "producer")
        super().__init__(config, keep, cache, progress, calibration=calibration, **kw)


__all__ = ["ThinPass"]
