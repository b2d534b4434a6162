"""Checking an untrusted model before anything reads its weights or walks its graph.

Why this module exists (``onnx.checker`` alone is not enough):
- A tensor's header is a claim: ``dims`` may promise 10¹² elements over 4 kB of
  data. numpy then fails deep inside a reshape, or a loader allocates what the
  header says. :func:`check_tensors` compares every tensor's declared size with
  the bytes it holds.
- With protobuf's upb backend every read of ``raw_data`` copies the bytes, and
  ``ByteSize()`` serialises the whole message: on a model that means a second
  copy of every weight. Here weights are touched one tensor at a time, and
  whole-model work (sizes, shape inference, the checker) runs on a
  :func:`light_copy` that has the structure but not the weights' bytes.
- The checker's messages for broken graphs are not one line and not specific
  (a cycle, a dangling input and a missing initializer all read "Nodes in a
  graph must be topologically sorted, however input 'x' of node: …").
  :func:`graph_problem` names the node and the tensor for each case.
- The checker needs the whole model in one protobuf (< 2 GiB) and insists on a
  ``shape`` for every graph input and output, which exporters do not always
  write. :func:`check_model` runs it on a *probe*: a copy without the weights'
  bytes (checked here instead) and with absent I/O shapes filled in for the
  probe only. The model itself is never changed.
"""
from __future__ import annotations

import math
import os
from typing import Iterator

import onnx
from onnx import TensorProto, external_data_helper

from onnxlr.errors import OnnxlrError

#: Bits per element where the raw bytes are packed below one byte per element.
_PACKED_BITS = {"UINT4": 4, "INT4": 4, "FLOAT4E2M1": 4, "UINT2": 2, "INT2": 2}
#: Types whose packing onnxlr does not know: their sizes are left to the checker and ORT.
_UNKNOWN_PACKING = {"FLOAT6E2M3", "FLOAT6E3M2", "UNDEFINED", "STRING"}
#: Typed value fields: data type → (field, values per element).
_TYPED_FIELDS = {
    TensorProto.FLOAT: ("float_data", 1), TensorProto.COMPLEX64: ("float_data", 2),
    TensorProto.DOUBLE: ("double_data", 1), TensorProto.COMPLEX128: ("double_data", 2),
    TensorProto.INT64: ("int64_data", 1), TensorProto.UINT32: ("uint64_data", 1),
    TensorProto.UINT64: ("uint64_data", 1), TensorProto.STRING: ("string_data", 1),
    **{t: ("int32_data", 1) for t in (
        TensorProto.INT32, TensorProto.INT16, TensorProto.INT8, TensorProto.UINT16,
        TensorProto.UINT8, TensorProto.BOOL, TensorProto.FLOAT16, TensorProto.BFLOAT16,
        TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E4M3FNUZ, TensorProto.FLOAT8E5M2,
        TensorProto.FLOAT8E5M2FNUZ)},
}
#: Ops whose inputs after the first are weights: an undefined one there is a missing initializer.
_WEIGHT_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization",
                         "LayerNormalization", "InstanceNormalization", "LSTM", "GRU", "RNN"})


def quote(name: str, limit: int = 120) -> str:
    """A name from the model as it may appear in a one-line message: quoted, escaped, bounded."""
    text = name if len(name) <= limit else name[:limit] + "…"
    return repr(text)


# --- tensors ------------------------------------------------------------------------------

def _varint_len(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def copy_meta(src: TensorProto, dst: TensorProto) -> None:
    """Copy every field of ``src`` into ``dst`` except ``raw_data`` (never read, never copied)."""
    for fd in src.DESCRIPTOR.fields:
        if fd.name == "raw_data":
            continue
        _copy_field(src, dst, fd, keep_below=0, stripped=None)


def raw_size(tensor: TensorProto) -> int:
    """``len(tensor.raw_data)``: a transient copy of this one tensor's bytes (upb has no
    cheaper way)."""
    return len(tensor.raw_data) if tensor.HasField("raw_data") else 0


def declared_elements(tensor: TensorProto) -> int:
    return math.prod(int(d) for d in tensor.dims)


def declared_bytes(tensor: TensorProto) -> int | None:
    """Bytes the tensor's dims and type need as raw data; None when onnxlr cannot tell."""
    name = TensorProto.DataType.Name(tensor.data_type) if tensor.data_type in \
        TensorProto.DataType.values() else "UNDEFINED"
    if name in _UNKNOWN_PACKING:
        return None
    n = declared_elements(tensor)
    if name in _PACKED_BITS:
        return (n * _PACKED_BITS[name] + 7) // 8
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        return None
    return n * itemsize


def tensor_problem(tensor: TensorProto) -> str | None:
    """Why a tensor's header and its data disagree (a lying header), or None.

    External-data tensors are checked where their file is read (``onnxlr.io``).
    """
    shape = "x".join(str(d) for d in tensor.dims) or "scalar"
    if any(d < 0 for d in tensor.dims):
        return f"tensor {quote(tensor.name)} declares a negative dimension ({shape})"
    if tensor.data_location == TensorProto.EXTERNAL:
        return None
    if tensor.HasField("raw_data"):
        need, have = declared_bytes(tensor), raw_size(tensor)
        if need is not None and need != have:
            return (f"tensor {quote(tensor.name)} declares shape {shape} "
                    f"({need} bytes) but holds {have} bytes of data")
        return None
    field, per = _TYPED_FIELDS.get(tensor.data_type, (None, 1))
    if field is None:
        return None
    have = len(getattr(tensor, field))
    need = declared_elements(tensor) * per
    if have != need:
        return (f"tensor {quote(tensor.name)} declares shape {shape} ({need} values) "
                f"but holds {have}")
    return None


def all_tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    """Initializers and tensor attributes, in subgraphs and functions too."""
    return external_data_helper._get_all_tensors(model)


def physical_memory() -> int | None:
    """This machine's memory in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def sparse_tensors(model: onnx.ModelProto) -> Iterator[onnx.SparseTensorProto]:
    """Sparse initializers and sparse tensor attributes, in subgraphs and functions too."""
    graphs = [model.graph]
    nodes = [n for f in model.functions for n in f.node]
    while graphs or nodes:
        if graphs:
            graph = graphs.pop()
            yield from graph.sparse_initializer
            nodes.extend(graph.node)
            continue
        for attr in nodes.pop().attribute:
            if attr.HasField("sparse_tensor"):
                yield attr.sparse_tensor
            yield from attr.sparse_tensors
            if attr.HasField("g"):
                graphs.append(attr.g)
            graphs.extend(attr.graphs)


def sparse_problem(sparse: onnx.SparseTensorProto) -> str | None:
    """Why a sparse tensor cannot be made dense safely (a lying or oversized header), or None.

    Checked before anything densifies it (onnx-graphsurgeon allocates what ``dims`` says):
    dims, the values/indices layout ONNX defines, indices inside the dense shape.
    """
    values, indices = sparse.values, sparse.indices
    name = quote(values.name)
    dims = [int(d) for d in sparse.dims]
    if any(d < 0 for d in dims):
        return f"sparse tensor {name} declares a negative dimension ({dims})"
    problem = tensor_problem(values) or tensor_problem(indices)
    if problem:
        return f"sparse tensor {name}: {problem}"
    if values.data_location == TensorProto.EXTERNAL or indices.data_location == TensorProto.EXTERNAL:
        return None  # checked once loaded (onnxlr.io)
    nnz = declared_elements(values) if len(values.dims) == 1 else -1
    if nnz < 0:
        return f"sparse tensor {name}: values must be 1-D, not {list(values.dims)}"
    if indices.data_type != TensorProto.INT64:
        return f"sparse tensor {name}: indices must be int64"
    layout = [int(d) for d in indices.dims]
    if layout not in ([nnz], [nnz, len(dims)]) and not (nnz == 0 and not layout):
        return (f"sparse tensor {name}: indices of shape {layout} for {nnz} values of a "
                f"{len(dims)}-D tensor (expected [{nnz}] or [{nnz}, {len(dims)}])")
    if nnz:
        from onnx import numpy_helper
        idx = numpy_helper.to_array(indices).reshape(nnz, -1)
        bounds = [math.prod(dims)] if idx.shape[1] == 1 else dims
        if (idx < 0).any() or (idx >= bounds).any():
            return f"sparse tensor {name}: an index lies outside its shape {dims}"
    return None


def _check_sparse(model: onnx.ModelProto, what: str) -> None:
    total = 0
    for sparse in sparse_tensors(model):
        problem = sparse_problem(sparse)
        if problem:
            raise OnnxlrError(f"{what}: {problem}")
        dense = TensorProto(data_type=sparse.values.data_type, dims=sparse.dims)
        total += declared_bytes(dense) or 0
    memory = physical_memory()
    if memory is not None and total > memory // 2:
        raise OnnxlrError(f"{what}: its sparse tensors declare {total} bytes once dense, more "
                          f"than half this machine's memory ({memory} bytes); refused")


def check_tensors(model: onnx.ModelProto, *, what: str) -> None:
    """Refuse any tensor whose declared size disagrees with its data, naming it; sparse
    tensors whose dense form would be inconsistent or too big for this machine.

    Raises:
        OnnxlrError: a lying header, or a tensor whose data lives in an external
            file that was never loaded (load the model with ``onnxlr.io.load_model``).
    """
    _check_sparse(model, what)
    for tensor in all_tensors(model):
        problem = tensor_problem(tensor)
        if problem:
            raise OnnxlrError(f"{what}: {problem}")
        if tensor.data_location == TensorProto.EXTERNAL:
            raise OnnxlrError(f"{what}: tensor {quote(tensor.name)} keeps its data in an "
                              f"external file that was not loaded; load the model from its "
                              f"file (onnxlr.io.load_model) so the data is read safely")


# --- graph structure ----------------------------------------------------------------------

def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.HasField("g"):
            yield attr.g
        yield from attr.graphs


def _defined(graph: onnx.GraphProto) -> set[str]:
    names = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    names |= {t.values.name for t in graph.sparse_initializer}
    for node in graph.node:
        names.update(o for o in node.output if o)
    return names


def _node_label(node: onnx.NodeProto, index: int) -> str:
    return quote(node.name) if node.name else f"#{index} ({node.op_type})"


def _implicit_inputs(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs read from the enclosing scopes (ONNX outer-scope references)."""
    outer: set[str] = set()
    for g in _subgraphs(node):
        inner = _defined(g)
        for n in g.node:
            outer.update(i for i in n.input if i and i not in inner)
            outer.update(i for i in _implicit_inputs(n) if i not in inner)
        outer.update(o.name for o in g.output if o.name not in inner)
    return outer


def _dangling(graph: onnx.GraphProto, scope: set[str], path: str) -> str | None:
    here = scope | _defined(graph)
    for i, node in enumerate(graph.node):
        for slot, name in enumerate(node.input):
            if name and name not in here:
                where = f" in {path}" if path else ""
                if node.op_type in _WEIGHT_OPS and slot > 0:
                    return (f"node {_node_label(node, i)} ({node.op_type}){where} reads weight "
                            f"{quote(name)}, but the model has no initializer or input of that "
                            f"name (missing initializer)")
                return (f"node {_node_label(node, i)} ({node.op_type}){where} reads "
                        f"{quote(name)}, which no node, graph input or initializer provides "
                        f"(dangling input)")
        for g in _subgraphs(node):
            problem = _dangling(g, here, f"a subgraph of node {_node_label(node, i)}")
            if problem:
                return problem
    for out in graph.output:
        if out.name not in here:
            return (f"graph output {quote(out.name)} is not produced by any node, input or "
                    f"initializer")
    return None


def _order(graph: onnx.GraphProto) -> tuple[list[int] | None, list[int]]:
    """(a topological order of the node indices, or None when there is a cycle; a cycle)."""
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    deps = []
    for node in graph.node:
        names = set(node.input) | _implicit_inputs(node)
        deps.append(sorted({producer[n] for n in names if n in producer}))
    state = [0] * len(graph.node)  # 0 new, 1 on the stack, 2 done
    order: list[int] = []
    for root in range(len(graph.node)):
        if state[root]:
            continue
        stack = [(root, iter(deps[root]))]
        state[root] = 1
        while stack:  # iterative DFS: a hostile graph may be deeper than Python's recursion limit
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = 2
                order.append(node)
                stack.pop()
            elif state[nxt] == 1:
                path = [s[0] for s in stack]
                return None, path[path.index(nxt):] + [nxt]
            elif state[nxt] == 0:
                state[nxt] = 1
                stack.append((nxt, iter(deps[nxt])))
    return order, []


def graph_problem(model: onnx.ModelProto, *, allow_unsorted: bool = False) -> str | None:
    """The first structural problem of the main graph (and its subgraphs), or None.

    Checks, each with its own message: inputs nothing provides (a dangling
    input, or a missing initializer when a layer's weight is absent), graph
    outputs nothing produces, cycles, and (unless ``allow_unsorted``) nodes
    out of topological order.
    """
    problem = _dangling(model.graph, set(), "")
    if problem:
        return problem
    graphs = [("", model.graph)]
    while graphs:
        path, graph = graphs.pop()
        order, cycle = _order(graph)
        where = f" in {path}" if path else ""
        if order is None:
            names = " -> ".join(_node_label(graph.node[i], i) for i in cycle)
            return f"the graph{where} has a cycle: {names}"
        if not allow_unsorted and order != sorted(order):
            first = next(k for k, i in enumerate(order) if i != k)
            late = graph.node[order[first]]
            return (f"nodes{where} are not in topological order (node "
                    f"{_node_label(late, order[first])} must come before node "
                    f"{_node_label(graph.node[first], first)})")
        for i, node in enumerate(graph.node):
            where = f"a subgraph of node {_node_label(node, i)}"
            graphs.extend((where, g) for g in _subgraphs(node))
    return None


def sort_nodes(graph: onnx.GraphProto) -> bool:
    """Put an acyclic graph's nodes in topological order (stable); True if anything moved."""
    order, _ = _order(graph)
    if order is None or order == sorted(order):
        return False
    nodes = [onnx.NodeProto() for _ in order]
    for new, old in zip(nodes, order):
        new.CopyFrom(graph.node[old])
    del graph.node[:]
    graph.node.extend(nodes)
    return True


# --- onnx.checker on a probe --------------------------------------------------------------

def _is_repeated(fd) -> bool:
    flag = getattr(fd, "is_repeated", None)
    return flag if flag is not None else fd.label == fd.LABEL_REPEATED


def _copy_field(src, dst, fd, *, keep_below: int, stripped: list | None) -> None:
    if _is_repeated(fd):
        items = getattr(src, fd.name)
        if fd.message_type is None:
            getattr(dst, fd.name).extend(items)
            return
        target = getattr(dst, fd.name)
        for item in items:
            _copy_message(item, target.add(), keep_below=keep_below, stripped=stripped)
        return
    if not src.HasField(fd.name):
        return
    if fd.message_type is None:
        setattr(dst, fd.name, getattr(src, fd.name))
    else:
        target = getattr(dst, fd.name)
        target.SetInParent()  # an empty message is information too (``shape {}``: a scalar)
        _copy_message(getattr(src, fd.name), target, keep_below=keep_below, stripped=stripped)


def _copy_message(src, dst, *, keep_below: int, stripped: list | None) -> None:
    if isinstance(src, TensorProto):
        copy_meta(src, dst)
        if src.HasField("raw_data"):
            raw = src.raw_data  # this tensor's bytes, once; dropped unless kept below
            if stripped is None or len(raw) < keep_below:
                dst.raw_data = raw
            else:
                stripped.append((src, dst, len(raw)))
        return
    if isinstance(src, onnx.SparseTensorProto):
        stripped = None  # values and indices must agree: keep a sparse tensor whole
    if not any(f.message_type is not None for f in src.DESCRIPTOR.fields):
        dst.CopyFrom(src)  # nothing below can hold a tensor
        return
    for fd in src.DESCRIPTOR.fields:
        _copy_field(src, dst, fd, keep_below=keep_below, stripped=stripped)


def light_copy(model: onnx.ModelProto, keep_below: int = 0) -> tuple[onnx.ModelProto, list]:
    """A copy of ``model`` without the ``raw_data`` bytes of its (non-sparse) tensors.

    Args:
        model: the model; only read.
        keep_below: tensors with fewer raw bytes than this keep them (shape
            tensors, for shape inference).

    Returns:
        ``(copy, stripped)`` with ``stripped`` a list of ``(source tensor, copied
        tensor, raw size)`` for every tensor whose bytes were left behind, in
        model order. Peak memory: the model, its structure and one tensor.
    """
    copy = onnx.ModelProto()
    stripped: list = []
    _copy_message(model, copy, keep_below=keep_below, stripped=stripped)
    return copy, stripped


def model_bytes(model: onnx.ModelProto) -> int:
    """About the serialised size of ``model`` (within a few bytes per tensor), without the
    second copy of every weight that ``model.ByteSize()`` makes."""
    probe, stripped = light_copy(model)
    return probe.ByteSize() + sum(n + 1 + _varint_len(n) for _, _, n in stripped)


def _fill_io_shapes(graph: onnx.GraphProto) -> None:
    for v in list(graph.input) + list(graph.output):
        if v.type.HasField("tensor_type") and not v.type.tensor_type.HasField("shape"):
            v.type.tensor_type.shape.SetInParent()  # the probe only: "some shape"
    for node in graph.node:
        for g in _subgraphs(node):
            _fill_io_shapes(g)


def check_model(model: onnx.ModelProto, *, what: str, allow_unsorted: bool = False) -> None:
    """Tensor sizes, graph structure, then ``onnx.checker`` on a weightless probe.

    Raises:
        OnnxlrError: one line naming ``what`` and the problem.
    """
    check_tensors(model, what=what)
    problem = graph_problem(model, allow_unsorted=allow_unsorted)
    if problem:
        raise OnnxlrError(f"{what}: {problem}")
    probe, stripped = light_copy(model)
    for _, dst, _ in stripped:
        # sizes were checked above; the checker only needs one value field per tensor
        del dst.dims[:]
        dst.dims.append(0)
        dst.raw_data = b""
    _fill_io_shapes(probe.graph)
    try:
        onnx.checker.check_model(probe)
    except Exception as exc:  # ValidationError, or anything the C++ checker throws on odd input
        text = str(exc).strip()
        first = text.splitlines()[0].rstrip(": ") if text else type(exc).__name__
        raise OnnxlrError(f"{what}: invalid ONNX model: {first}") from None
