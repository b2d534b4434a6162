"""Finding candidate layers: each becomes a :class:`LayerSite` or a decline reason.

A site is a Gemm, MatMul or Conv whose weight is a constant (an initializer or
a ``Constant`` node output). The checks here return *reasons*: a declined layer
is information for the user, never a silent skip.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxlr.graph import constant_value, static_shape
from onnxlr.records import Declined

FLOAT_KINDS = ("f",)
#: Float types numpy knows only through ml_dtypes (``dtype.kind`` is 'V'): decomposed in float64.
EXTRA_FLOAT_DTYPES = ("bfloat16",)
#: Quantized layers: their integer weights and scales are left exactly as they are.
QUANTIZED_OPS = ("QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "QGemm")
#: Recurrent layers: their input weights W ([directions, gates·hidden, input]) are a matrix
#: product of the input at every step, which a low-rank factor in front can shrink (the
#: recurrence R is not touched: it needs the full hidden state).
RECURRENT_OPS = ("LSTM", "GRU", "RNN")
#: Every op a layer site can be.
LAYER_OPS = ("Gemm", "MatMul", "Conv") + RECURRENT_OPS


#: Site kinds whose input is a matrix of rows (every leading dim a row, features last): a
#: recurrent layer's input weights act on its input's rows like a MatMul's.
MATRIX_KINDS = ("gemm", "matmul", "rnn")


@dataclass
class LayerSite:
    """A layer that can be factorised, with everything the methods need.

    ``weight`` is the stored weight: Gemm's B as stored, MatMul's right operand
    [K, N], Conv's [T, S, k1, ..]. ``in_spatial``/``out_spatial`` are the
    spatial sizes (conv) or the number of rows (Gemm/MatMul); unknown dims
    count as 1, so MAC counts are then per position (flagged by ``shapes_known``).
    """

    node: gs.Node
    kind: str
    weight: np.ndarray
    bias: np.ndarray | None
    in_spatial: tuple[int, ...]
    out_spatial: tuple[int, ...]
    shapes_known: bool

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def matrix(self) -> np.ndarray:
        """The 2-D matrix an SVD factorises, oriented input-dim × output-dim for Gemm/MatMul
        and output-channels × (input-channels·kernel) for Conv."""
        if self.kind == "gemm":
            return self.weight.T if self.node.attrs.get("transB", 0) else self.weight
        if self.kind == "matmul":
            return self.weight
        if self.kind == "rnn":  # every direction's and gate's input weights, stacked: I × D·G·H
            return self.weight.reshape(-1, self.weight.shape[-1]).T
        return self.weight.reshape(self.weight.shape[0], -1)

    @property
    def in_positions(self) -> int:
        return math.prod(self.in_spatial)

    @property
    def out_positions(self) -> int:
        return math.prod(self.out_spatial)

    @property
    def params(self) -> int:
        return int(self.weight.size + (self.bias.size if self.bias is not None else 0))

    @property
    def macs(self) -> int:
        if self.kind in MATRIX_KINDS:
            k, n = self.matrix.shape
            return k * n * self.out_positions
        return int(self.weight.size) * self.out_positions


def _positions(shape, spatial_rank: int | None) -> tuple[tuple[int, ...], bool]:
    """Spatial dims of an activation (conv) or rows of a matrix input (Gemm/MatMul)."""
    if shape is None:
        return (1,) * (spatial_rank or 1), False
    if spatial_rank is None:  # matrix input: every leading dim is a row
        dims = shape[:-1]
    else:
        dims = shape[2:]
    known = all(d is not None for d in dims)
    return tuple(d if d is not None else 1 for d in dims) or (1,), known


def _computed_weight(tensor: gs.Tensor | None) -> str | None:
    """Why a weight computed from constants is left alone, for the producers worth naming."""
    producer = tensor.inputs[0] if tensor is not None and len(tensor.inputs) == 1 else None
    if producer is None:
        return None
    if producer.op == "DequantizeLinear":
        return ("weight comes from DequantizeLinear (a quantized model): its integer "
                "weights and scales are left alone")
    if producer.op == "Transpose" and producer.inputs and isinstance(producer.inputs[0], gs.Constant):
        src = producer.inputs[0]  # prepare() folds the transpose of a weight with one user
        if len(src.outputs) > 1:
            return (f"weight is a Transpose of {src.name!r}, which {len(src.outputs) - 1} other "
                    f"node(s) also use (tied weights, e.g. a head sharing an embedding): "
                    f"left alone")
    return None


def _float_weight(value: np.ndarray | None, tensor: gs.Tensor | None = None) -> str | None:
    if value is None:
        return _computed_weight(tensor) or "weight is not a constant (computed at run time)"
    if value.dtype.kind not in FLOAT_KINDS and value.dtype.name not in EXTRA_FLOAT_DTYPES:
        return f"weight has dtype {value.dtype} (quantized or integer layers are left alone)"
    return None


def is_quantized(node: gs.Node) -> bool:
    """A quantized layer (QLinearConv, ..., or a float layer whose weight DequantizeLinear
    makes at run time): declined, but a layer the reports list, unlike activation MatMuls."""
    if node.op in QUANTIZED_OPS:
        return True
    if node.op in LAYER_OPS and len(node.inputs) > 1:
        producers = node.inputs[1].inputs
        return len(producers) == 1 and producers[0].op == "DequantizeLinear"
    return False


def find_site(node: gs.Node, graph: gs.Graph | None = None) -> LayerSite | Declined:
    """Match one node: a :class:`LayerSite`, or why it cannot be factorised (:class:`Declined`).

    Args:
        node: the node.
        graph: its graph, when known: a weight that is also a graph input (a
            value the user may feed at run time) is then left alone, and so is a
            Gemm before opset 11 (whose C input is mandatory).
    """
    site = _match(node, graph)
    return site if isinstance(site, LayerSite) else Declined(site)


def _match(node: gs.Node, graph: gs.Graph | None) -> LayerSite | str:
    if node.op in QUANTIZED_OPS:
        return f"quantized layer ({node.op}): its integer weights and scales are left alone"
    if node.op not in LAYER_OPS:
        return f"op {node.op} is not a candidate"
    if len(node.inputs) < 2 or not node.outputs:
        return f"{node.op} with {len(node.inputs)} input(s) and {len(node.outputs)} output(s)"
    if graph is not None:
        reason = _graph_context(node, graph)
        if reason:
            return reason
    if node.op == "Gemm":
        return _gemm_site(node)
    if node.op == "MatMul":
        return _matmul_site(node)
    if node.op in RECURRENT_OPS:
        return _recurrent_site(node, graph)
    return _conv_site(node)


def _recurrent_site(node: gs.Node, graph: gs.Graph | None) -> LayerSite | str:
    """An LSTM/GRU/RNN's input weights W [D, G·H, I]: ``x·Wᵀ`` for every step's input."""
    w_in = node.inputs[1]
    w = constant_value(w_in)
    reason = _float_weight(w, w_in) or _shared(w_in)
    if reason:
        return reason
    if w.ndim != 3:
        return f"{node.op} input weight has rank {w.ndim}"
    used = [t.name for t in node.outputs[1:] if t.name and (t.outputs or (
        graph is not None and any(t is o for o in graph.outputs)))]
    if used:  # the search's gated graph carries one output per layer
        return (f"{node.op} whose final state output(s) {', '.join(used)} are used: only a "
                f"recurrent layer read through its sequence output Y is a candidate")
    x_shape = static_shape(node.inputs[0])
    if x_shape is not None and len(x_shape) != 3:
        return f"{node.op} input of rank {len(x_shape)}"
    rows, known = _positions(x_shape, None)
    return LayerSite(node, "rnn", w, None, rows, rows, known)


def _graph_context(node: gs.Node, graph: gs.Graph) -> str | None:
    if len(node.inputs) > 1:
        weight = node.inputs[1]
        if isinstance(weight, gs.Constant) and any(t is weight for t in graph.inputs):
            return (f"weight {weight.name!r} is also a graph input (a value that can be fed at "
                    f"run time), so it is left alone")
    if node.op == "Gemm" and graph.opset is not None and int(graph.opset) < 11:
        return (f"Gemm at opset {graph.opset}: its C input is mandatory before opset 11, which "
                f"the factorised chain does not provide (convert the model to opset >= 11)")
    return None


def _shared(tensor: gs.Tensor) -> str | None:
    users = [n for n in tensor.outputs]
    if len(users) > 1:
        return (f"weight {tensor.name!r} is shared by {len(users)} nodes; factorising one "
                f"would duplicate it, so it is left alone")
    return None


def _gemm_site(node: gs.Node) -> LayerSite | str:
    if len(node.inputs) < 2:
        return "Gemm without a B input"
    a, b = node.inputs[0], node.inputs[1]
    w = constant_value(b)
    if w is None and constant_value(a) is not None:
        return "Gemm's constant operand is A, not B (not supported)"
    reason = _float_weight(w, b) or _shared(b)
    if reason:
        return reason
    if w.ndim != 2:
        return f"Gemm weight has rank {w.ndim}"
    bias = None
    if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
        bias = constant_value(node.inputs[2])
    out_shape = static_shape(node.outputs[0])
    rows, known = _positions(out_shape, None)
    return LayerSite(node, "gemm", w, bias, rows, rows, known)


def _matmul_site(node: gs.Node) -> LayerSite | str:
    x, b = node.inputs[0], node.inputs[1]
    w = constant_value(b)
    if w is None:
        if constant_value(x) is not None:
            return "MatMul's constant operand is on the left (not supported)"
        return _computed_weight(b) or "both MatMul operands are activations"
    reason = _float_weight(w, b) or _shared(b)
    if reason:
        return reason
    if w.ndim != 2:
        return f"MatMul weight has rank {w.ndim} (only 2-D right operands are factorised)"
    x_shape = static_shape(x)
    if x_shape is not None and len(x_shape) < 2:
        return "MatMul with a 1-D left operand"
    rows, known = _positions(x_shape, None)
    return LayerSite(node, "matmul", w, None, rows, rows, known)


def _conv_site(node: gs.Node) -> LayerSite | str:
    x, wt = node.inputs[0], node.inputs[1]
    w = constant_value(wt)
    reason = _float_weight(w, wt) or _shared(wt)
    if reason:
        return reason
    if w.ndim < 3 or w.ndim > 5:
        return f"Conv weight has rank {w.ndim} (1-D, 2-D and 3-D convs are supported)"
    group = int(node.attrs.get("group", 1))
    if group != 1:
        if group == w.shape[0] and w.shape[1] == 1:
            return "depthwise convolution: nothing to factorise"
        return f"grouped convolution (group={group}) is not factorised"
    bias = None
    if len(node.inputs) > 2 and node.inputs[2].name:
        bias = constant_value(node.inputs[2])
        if bias is None:
            return "Conv bias is not a constant"
    spatial_rank = w.ndim - 2
    in_sp, in_known = _positions(static_shape(x), spatial_rank)
    out_sp, out_known = _positions(static_shape(node.outputs[0]), spatial_rank)
    kind = "conv1x1" if all(k == 1 for k in w.shape[2:]) else "conv"
    return LayerSite(node, kind, w, bias, in_sp, out_sp, in_known and out_known)


def _subgraphs(node: gs.Node):
    for value in node.attrs.values():
        for g in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(g, gs.Graph):
                yield g


def nested_layer_records(graph: gs.Graph) -> list:
    """Records for the Gemm/MatMul/Conv layers inside If/Loop/Scan bodies: all left alone.

    Rewriting a subgraph would have to respect its scoping rules (outer-scope
    weights, loop-carried values); onnxlr does not, and says so per layer.
    """
    from onnxlr.records import LayerRecord  # records import nothing from here; keep it local

    out, todo = [], [(node, "") for node in graph.nodes]
    while todo:
        node, outer = todo.pop(0)
        for sub in _subgraphs(node):
            where = f"{outer}{node.op} {node.name!r} ({sub.name or 'body'})"
            for inner in sub.nodes:
                todo.append((inner, where + " > "))
                if inner.op not in LAYER_OPS + QUANTIZED_OPS:
                    continue
                record = LayerRecord(name=inner.name, op=inner.op)
                site = find_site(inner)
                why = "layers inside If/Loop/Scan subgraphs are left alone"
                if isinstance(site, LayerSite):
                    record.kind = site.kind
                    record.weight_shape = tuple(int(d) for d in site.weight.shape)
                    record.params_before = record.params_after = site.params
                    record.macs_before = record.macs_after = site.macs
                else:
                    why += f" ({site})"
                    if is_quantized(inner):
                        record.extra["quantized"] = True
                record.reason = f"inside {where}: {why}"
                out.append(record)
    return out
