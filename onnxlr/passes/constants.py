"""``Constant`` nodes → initializers, so every weight looks the same to later passes.

Exported models hold weights both ways (PyTorch's exporter emits ``Constant``
nodes for some). Only tensor-valued constants (attribute ``value``) consumed
by nodes are converted; graph outputs produced by a Constant keep their node.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxlr.graph import is_graph_output
from onnxlr.passes.base import Pass, PassResult


class ConstantsToInitializers(Pass):
    name = "constants-to-initializers"

    def call(self, graph: gs.Graph) -> PassResult:
        modified = False
        for node in graph.nodes:
            if node.op != "Constant" or node.domain not in ("", "ai.onnx", None):
                continue
            value = node.attrs.get("value")
            out = node.outputs[0] if node.outputs else None
            if not isinstance(value, gs.Constant) or out is None or is_graph_output(graph, out):
                continue
            _replace_with_constant(node, gs.Constant(out.name, np.asarray(value.values)))
            modified = True
        return PassResult(modified)


class FoldConstantTranspose(Pass):
    """``Transpose(W)`` of a constant → the transposed constant, so that ``MatMul(x, Transpose(W))``
    (exports made without constant folding) is a candidate like ``MatMul(x, W^T)``.

    Only when the Transpose is the constant's one user: a weight that other nodes also use
    (a head tied to an embedding) stays as it is, and the layer is declined with that reason.
    """

    name = "fold-constant-transpose"

    def call(self, graph: gs.Graph) -> PassResult:
        modified = False
        for node in graph.nodes:
            if node.op != "Transpose" or len(node.inputs) != 1 or len(node.outputs) != 1:
                continue
            src, out = node.inputs[0], node.outputs[0]
            if not isinstance(src, gs.Constant) or len(src.outputs) != 1 or is_graph_output(graph, out):
                continue
            values = np.asarray(src.values)
            perm = node.attrs.get("perm") or list(range(values.ndim))[::-1]
            _replace_with_constant(
                node, gs.Constant(out.name, np.ascontiguousarray(values.transpose(perm))))
            modified = True
        return PassResult(modified)


def _replace_with_constant(node: gs.Node, const: gs.Constant) -> None:
    """Every reader of ``node``'s output reads ``const`` instead; the node is left dangling
    (cleanup removes it)."""
    out = node.outputs[0]
    for consumer in list(out.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is out:
                consumer.inputs[i] = const
    node.outputs.clear()
