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
from onnx_graphsurgeon.logger import G_LOGGER

from onnxlr import validate
from onnxlr.errors import OnnxlrError

logger = logging.getLogger(__name__)
_gs_logger = logging.getLogger("onnx_graphsurgeon")


def _gs_log(message, severity, mode=None, stack_depth=2) -> None:  # noqa: ARG001
    """onnx-graphsurgeon prints its messages to stdout, where a pipeline parses the report:
    they go to Python logging (stderr) instead, at the same level."""
    if _gs_logger.isEnabledFor(max(severity, logging.DEBUG)):
        _gs_logger.log(max(severity, logging.DEBUG), "%s", message() if callable(message)
                       else message)


G_LOGGER.log = _gs_log


#: Tensors smaller than this keep their values for shape inference (shape operands, axes).
_SHAPE_DATA_BYTES = 4096
#: onnx's data propagation materialises 1-D tensors: measured 7.6 s and 1.4 GB for one
#: 10**7-element input. It is only worth it for shape-sized vectors.
_DATA_PROP_MAX_LENGTH = 4096


def _long_1d(model: onnx.ModelProto) -> bool:
    g = model.graph
    dims = [list(t.dims) for t in g.initializer]
    for v in list(g.input) + list(g.output) + list(g.value_info):
        if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape"):
            dims.append([d.dim_value if d.HasField("dim_value") else 0
                         for d in v.type.tensor_type.shape.dim])
    return any(len(d) == 1 and d[0] > _DATA_PROP_MAX_LENGTH for d in dims)


def _inferred(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """Shape inference on a copy without the weights' bytes (it needs their types and dims,
    and only small tensors' values), so it costs no second copy of the weights and works
    for models over 2 GB too. Data propagation runs only where no long 1-D tensor would make
    it slow and big. None when inference fails (shapes are a help, not a must)."""
    probe, _ = validate.light_copy(model, keep_below=_SHAPE_DATA_BYTES)
    try:
        plain = onnx.shape_inference.infer_shapes(probe, strict_mode=False, data_prop=False)
        if _long_1d(plain):
            return plain
        return onnx.shape_inference.infer_shapes(probe, strict_mode=False, data_prop=True)
    except Exception as exc:  # inference is best effort: custom ops, odd models
        text = str(exc).strip().splitlines()
        logger.warning("shape inference failed: %s", text[0] if text else type(exc).__name__)
        return None


def type_problem(model: onnx.ModelProto) -> str | None:
    """What strict ONNX type and shape inference refuses in ``model``, or None.

    A model it refuses (a Conv whose weight and input differ in dtype, say) is one ONNX
    Runtime will not load either: when the result is not verified this is the check that
    still runs. On a weightless copy, like :func:`_inferred`.
    """
    probe, _ = validate.light_copy(model, keep_below=_SHAPE_DATA_BYTES)
    for sparse in probe.graph.sparse_initializer:  # inference reads only dense initializers
        probe.graph.initializer.add(name=sparse.values.name, data_type=sparse.values.data_type,
                                    dims=sparse.dims)
    del probe.graph.sparse_initializer[:]
    try:
        onnx.shape_inference.infer_shapes(probe, check_type=True, strict_mode=True)
    except Exception as exc:  # InferenceError, or whatever the C++ side throws on odd input
        text = str(exc).strip().splitlines()
        return text[0] if text else type(exc).__name__
    return None


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with inferred ``value_info``; on failure the model unchanged."""
    inferred = _inferred(model)
    if inferred is None:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.value_info[:]
    out.graph.value_info.extend(inferred.graph.value_info)
    del out.graph.output[:]
    out.graph.output.extend(inferred.graph.output)
    return out


def apply_shapes(graph: gs.Graph, inferred: onnx.ModelProto, *, replace: bool = False) -> None:
    """Give the graph's variables the shapes and types inference found for them (``replace``:
    also where they have some already, the graph inputs included)."""
    from onnx_graphsurgeon.importers.onnx_importer import (get_onnx_tensor_dtype,
                                                           get_onnx_tensor_shape)

    g = inferred.graph
    infos = {v.name: v for v in list(g.value_info) + list(g.output)
             + (list(g.input) if replace else [])}
    for name, tensor in graph.tensors().items():
        info = infos.get(name)
        if info is None or not isinstance(tensor, gs.Variable):
            continue
        if tensor.dtype is None or replace:
            tensor.dtype = get_onnx_tensor_dtype(info)
        if tensor.shape is None or replace:
            tensor.shape = get_onnx_tensor_shape(info)


def _shapes_known(graph: gs.Graph) -> bool:
    """Whether every variable already has a dtype and a shape, so that :func:`apply_shapes`
    would change nothing: a model this module exported (the prepared model, converted again
    by every later step) carries its inferred shapes as ``value_info``, and inferring them
    again cost two full passes of onnx's shape inference per conversion."""
    return all(t.dtype is not None and t.shape is not None
               for name, t in graph.tensors().items() if name and isinstance(t, gs.Variable))


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    """Import into onnx-graphsurgeon, with shapes inferred where possible (and not already
    known from the model's ``value_info``).

    The model is checked first (tensor sizes against their data, dangling
    inputs, cycles: :mod:`onnxlr.validate`), so that an in-memory model gets
    the same one-line errors as a file. onnx-graphsurgeon drops graph inputs
    that have an initializer; from IR version 4 on those are *overridable*
    weights, so they are put back (and left alone by the sites). Before IR 4
    every initializer had to be listed as an input: there they are constants.
    """
    validate.check_tensors(model, what="model")
    problem = validate.graph_problem(model, allow_unsorted=True)
    if problem:
        raise OnnxlrError(f"model: {problem}")
    try:
        graph = gs.import_onnx(model)
    except Exception as exc:
        text = str(exc).strip().splitlines()
        raise OnnxlrError(f"cannot read the graph: {text[0] if text else type(exc).__name__}") \
            from None
    _densify_sparse(graph)
    _read_referenced_lazily(graph)
    if not _shapes_known(graph):
        inferred = _inferred(model)
        if inferred is not None:
            apply_shapes(graph, inferred)
    if model.ir_version >= 4:
        tensors = graph.tensors()
        names = [v.name for v in model.graph.input]
        if len(names) != len(graph.inputs) and all(n in tensors for n in names):
            graph.inputs = [tensors[n] for n in names]
    return graph


class _Referenced(gs.ir.tensor.LazyValues):
    """Values of a weight left in its file (:mod:`onnxlr.referenced`): read from there.
    onnx-graphsurgeon's exporter hands the tensor on as it is (a reference, no bytes)."""

    def load(self):
        from onnxlr.referenced import read_array
        return read_array(self.tensor)


def _read_referenced_lazily(graph: gs.Graph) -> None:
    from onnxlr.referenced import is_referenced

    for g in [graph, *graph.subgraphs(recursive=True)]:
        for tensor in g.tensors().values():
            lazy = getattr(tensor, "_values", None)
            if type(lazy) is gs.ir.tensor.LazyValues and is_referenced(lazy.tensor):
                tensor._values = _Referenced(lazy.tensor)  # noqa: SLF001


def _densify_sparse(graph: gs.Graph) -> None:
    """Sparse initializers become dense constants of their own dtype, here.

    onnx-graphsurgeon would densify them itself when first read, as float64 (ORT then
    refuses the model) and from typed fields only. Their dims were checked by
    :func:`onnxlr.validate.check_tensors` before this allocates them.
    """
    from onnx import numpy_helper
    from onnx_graphsurgeon.ir.tensor import SparseValues

    for g in [graph, *graph.subgraphs(recursive=True)]:
        for tensor in g.tensors().values():
            lazy = getattr(tensor, "_values", None)
            if not isinstance(lazy, SparseValues):
                continue
            sparse = lazy.tensor
            values = numpy_helper.to_array(sparse.values)
            dense = np.zeros(tuple(sparse.dims), dtype=values.dtype)
            if values.size:
                index = numpy_helper.to_array(sparse.indices).reshape(values.size, -1)
                flat = index[:, 0] if index.shape[1] == 1 else np.ravel_multi_index(
                    tuple(index.T), dense.shape)
                dense.reshape(-1)[flat] = values
            tensor.values = dense


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
    if original.ir_version < 4:
        _initializers_as_inputs(model, original)
    return model


def _initializers_as_inputs(model: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """IR < 4 requires every initializer to be a graph input too; keep the original's order."""
    have = {v.name: v for v in model.graph.input}
    order = [v.name for v in original.graph.input]
    extra = [t for t in model.graph.initializer if t.name not in have]
    for t in extra:
        have[t.name] = onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
    names = [n for n in order if n in have] + [n for n in have if n not in order]
    inputs = [have[n] for n in names]
    del model.graph.input[:]
    model.graph.input.extend(inputs)


def constant_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of a constant tensor (initializer or ``Constant`` node output), else None.

    Raises:
        OnnxlrError: the tensor's data does not match its declared shape.
    """
    if isinstance(tensor, gs.Constant):
        return _values(tensor)
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        value = tensor.inputs[0].attrs.get("value")
        if isinstance(value, gs.Constant):
            return _values(value)
    return None


def _values(const: gs.Constant) -> np.ndarray:
    lazy = getattr(const, "_values", None)
    if isinstance(lazy, _Referenced):
        return lazy.load()  # not kept on the constant: one weight in memory at a time
    try:
        return np.asarray(const.values)
    except (ValueError, TypeError) as exc:  # a header that lies about the data (numpy reshape)
        raise OnnxlrError(f"tensor {validate.quote(const.name)}: its data does not match its "
                          f"declared shape ({str(exc).splitlines()[0]})") from None


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


def feedable_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The graph inputs a caller feeds: those that are not initializers (old exports list
    every weight as an input too)."""
    inits = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in inits]
