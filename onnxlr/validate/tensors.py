"""Tensors checked against their own headers, before anything reads their data.

A tensor's header is a claim: ``dims`` may promise 10¹² elements over 4 kB of data. numpy
then fails deep inside a reshape, or a loader allocates what the header says.
:func:`check_tensors` compares every tensor's declared size with the bytes it holds, one
tensor at a time (with protobuf's upb backend every read of ``raw_data`` copies the bytes).
Also here, as every check's messages use it: :func:`quote` for a name from the model.
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


def quote(name: str, limit: int = 120) -> str:
    """A name from the model as it may appear in a one-line message: quoted, escaped, bounded."""
    text = name if len(name) <= limit else name[:limit] + "…"
    return repr(text)


def _varint_len(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


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


#: The external-data entry ``onnxlr.io`` adds to a tensor whose file it checked and left the
#: bytes in (``onnxlr.referenced``): the folder to read them from.
FOLDER_KEY = "onnxlr.folder"


def is_referenced(tensor: TensorProto) -> bool:
    """Whether the tensor's bytes were left in an external file already checked."""
    return tensor.data_location == TensorProto.EXTERNAL and any(
        e.key == FOLDER_KEY for e in tensor.external_data)


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
        if tensor.data_location == TensorProto.EXTERNAL and not is_referenced(tensor):
            raise OnnxlrError(f"{what}: tensor {quote(tensor.name)} keeps its data in an "
                              f"external file that was not loaded; load the model from its "
                              f"file (onnxlr.io.load_model) so the data is read safely")
