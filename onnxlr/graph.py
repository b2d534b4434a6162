"""The model as an onnx-graphsurgeon graph, and back, losing nothing.

onnx-graphsurgeon's exporter rebuilds the ModelProto and drops model-level
fields it does not know (doc string, metadata, model version, extra opset
domains such as ``ai.onnx.ml`` when no node uses them), so :func:`to_model`
copies them back from the original. Also here: access to constant weights
(initializers or ``Constant`` nodes), fresh node names, and shape inference.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxlr.errors import OnnxlrError

logger = logging.getLogger(__name__)


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape-infer a model; on failure return it unchanged (shapes are a help, not a must)."""
    try:
        if model.ByteSize() < 2**31 - 1:
            return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception as exc:  # inference is best effort: custom ops, odd models
        logger.warning("shape inference failed: %s", str(exc).splitlines()[0] if str(exc) else exc)
    return model


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    """Import into onnx-graphsurgeon, with shapes inferred where possible."""
    try:
        return gs.import_onnx(infer_shapes(model))
    except Exception as exc:
        raise OnnxlrError(f"cannot read the graph: {str(exc).splitlines()[0]}") from None


def to_model(graph: gs.Graph, original: onnx.ModelProto) -> onnx.ModelProto:
    """Export the graph and restore what the exporter drops from ``original``."""
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    model = gs.export_onnx(graph, do_type_check=False)
    model.ir_version = original.ir_version
    model.producer_name = original.producer_name
    model.producer_version = original.producer_version
    model.domain = original.domain
    model.model_version = original.model_version
    model.doc_string = original.doc_string
    del model.metadata_props[:]
    model.metadata_props.extend(original.metadata_props)
    have = {op.domain for op in model.opset_import}
    for op in original.opset_import:
        if op.domain not in have:
            model.opset_import.append(op)
    if original.training_info:
        model.training_info.extend(original.training_info)
    model.graph.doc_string = original.graph.doc_string
    return model


def constant_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of a constant tensor (initializer or ``Constant`` node output), else None."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        value = tensor.inputs[0].attrs.get("value")
        if isinstance(value, gs.Constant):
            return np.asarray(value.values)
    return None


def is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(t is tensor for t in graph.outputs)


class NameScope:
    """Hands out node and tensor names that do not clash with the graph's.

    Names read ``<original node>/<method>/<part>`` so a user finds them in Netron.
    """

    def __init__(self, graph: gs.Graph):
        self.used = {n.name for n in graph.nodes} | set(graph.tensors().keys())

    def __call__(self, name: str) -> str:
        candidate, i = name, 1
        while candidate in self.used:
            candidate = f"{name}_{i}"
            i += 1
        self.used.add(candidate)
        return candidate


def static_shape(tensor: gs.Tensor) -> tuple[int | None, ...] | None:
    """The tensor's shape with unknown/symbolic dims as None, or None if unknown."""
    shape = tensor.shape
    if shape is None:
        return None
    return tuple(d if isinstance(d, (int, np.integer)) and d >= 0 else None for d in shape)
