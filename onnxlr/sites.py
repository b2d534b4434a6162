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

FLOAT_KINDS = ("f",)


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
        if self.kind in ("gemm", "matmul"):
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


def _float_weight(value: np.ndarray | None) -> str | None:
    if value is None:
        return "weight is not a constant (computed at run time)"
    if value.dtype.kind not in FLOAT_KINDS:
        return f"weight has dtype {value.dtype} (quantized or integer layers are left alone)"
    return None


def find_site(node: gs.Node) -> LayerSite | str:
    """Match one node: a :class:`LayerSite`, or the reason it cannot be factorised."""
    if node.op == "Gemm":
        return _gemm_site(node)
    if node.op == "MatMul":
        return _matmul_site(node)
    if node.op == "Conv":
        return _conv_site(node)
    return f"op {node.op} is not a candidate"


def _shared(tensor: gs.Tensor) -> str | None:
    users = [n for n in tensor.outputs]
    if len(users) > 1:
        return (f"weight '{tensor.name}' is shared by {len(users)} nodes; factorising one "
                f"would duplicate it, so it is left alone")
    return None


def _gemm_site(node: gs.Node) -> LayerSite | str:
    if len(node.inputs) < 2:
        return "Gemm without a B input"
    a, b = node.inputs[0], node.inputs[1]
    w = constant_value(b)
    if w is None and constant_value(a) is not None:
        return "Gemm's constant operand is A, not B (not supported)"
    reason = _float_weight(w) or _shared(b)
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
        return "both MatMul operands are activations"
    reason = _float_weight(w) or _shared(b)
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
    reason = _float_weight(w) or _shared(wt)
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
