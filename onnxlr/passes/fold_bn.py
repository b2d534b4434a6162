"""Fold an inference-mode ``BatchNormalization`` that follows a Conv into the Conv.

y = γ·(conv(x) − μ)/√(σ²+ε) + β  ⇒  W' = W·s, b' = (b − μ)·s + β with s = γ/√(σ²+ε),
per output channel. Done before factorising so the factors carry the folded
weights (one fewer op per layer, and the rank rule sees the real scale).
Matches onnxscript's ``_fuse_batchnorm`` rule; computed in float64.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxlr.graph import constant_value, is_graph_output
from onnxlr.passes.base import Pass, PassResult


def fold_bn_params(w: np.ndarray, b: np.ndarray | None, gamma, beta, mean, var, eps: float):
    """Return (W', b') in float64; pure numpy, tested on its own."""
    scale = np.asarray(gamma, np.float64) / np.sqrt(np.asarray(var, np.float64) + eps)
    w2 = np.asarray(w, np.float64) * scale.reshape((-1,) + (1,) * (w.ndim - 1))
    b0 = np.zeros(w.shape[0]) if b is None else np.asarray(b, np.float64)
    b2 = (b0 - np.asarray(mean, np.float64)) * scale + np.asarray(beta, np.float64)
    return w2, b2


class FoldBatchNorm(Pass):
    name = "fold-batchnorm"

    def call(self, graph: gs.Graph) -> PassResult:
        modified = False
        for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
            if self._fold(graph, bn):
                modified = True
        return PassResult(modified)

    @staticmethod
    def _fold(graph: gs.Graph, bn: gs.Node) -> bool:
        if len(bn.outputs) != 1 or bn.attrs.get("training_mode", 0):
            return False
        x = bn.inputs[0]
        if len(x.inputs) != 1 or x.inputs[0].op != "Conv" or len(x.outputs) != 1:
            return False
        if is_graph_output(graph, x):
            return False
        conv = x.inputs[0]
        params = [constant_value(t) for t in bn.inputs[1:5]]
        w = constant_value(conv.inputs[1])
        if w is None or any(p is None for p in params) or len(conv.inputs[1].outputs) != 1:
            return False
        if w.dtype.kind != "f":
            return False
        b = None
        if len(conv.inputs) > 2 and conv.inputs[2].name:
            b = constant_value(conv.inputs[2])
            if b is None or len(conv.inputs[2].outputs) != 1:
                return False
        w2, b2 = fold_bn_params(w, b, *params, eps=float(bn.attrs.get("epsilon", 1e-5)))
        y = bn.outputs[0]
        conv.inputs[1] = gs.Constant(conv.inputs[1].name + "_bnfolded", w2.astype(w.dtype))
        bias = gs.Constant(conv.name + "_bias_bnfolded", b2.astype(w.dtype))
        if len(conv.inputs) > 2:
            conv.inputs[2] = bias
        else:
            conv.inputs.append(bias)
        bn.outputs.clear()
        conv.outputs[0] = y
        return True
