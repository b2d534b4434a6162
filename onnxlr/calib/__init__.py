"""Calibration inputs, and capturing a model's intermediate activations on them.

Data-aware compression needs what each layer actually sees. The room has two jobs:

``loading``    read a calibration set (``.npz``, a folder, feed dicts), validate it against
               the model's inputs, iterate over it in batches (:func:`load_calibration`,
               :class:`Calibration`)
``capturing``  run it through ONNX Runtime with chosen intermediate tensors exposed as extra
               outputs, one batch at a time (:func:`capture`, :func:`expose`,
               :class:`GramReducer`)

Both modules' docstrings give the API; everything is re-exported here, so
``from onnxlr.calib import capture, load_calibration`` works as before the split.
"""
from __future__ import annotations

from onnxlr.calib.capturing import GramReducer, capture, expose
from onnxlr.calib.loading import LABEL, Calibration, load_calibration
from onnxlr.linalg.whiten import LayerStats

__all__ = ["LABEL", "Calibration", "GramReducer", "LayerStats", "capture", "expose",
           "load_calibration"]
