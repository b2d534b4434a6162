"""``onnx.checker`` on a probe: the model's structure without its weights' bytes.

The checker needs the whole model in one protobuf (< 2 GiB) and insists on a ``shape`` for
every graph input and output, which exporters do not always write; ``ByteSize()``
serialises the whole message, a second copy of every weight. :func:`check_model` runs it
on a :func:`light_copy` (the weights' bytes checked by :mod:`onnxlr.validate.tensors`
instead) with absent I/O shapes filled in for the probe only. The model itself is never
changed.
"""
from __future__ import annotations

import onnx
from onnx import TensorProto

from onnxlr.errors import OnnxlrError
from onnxlr.validate.structure import _subgraphs, graph_problem
from onnxlr.validate.tensors import _varint_len, all_tensors, check_tensors, is_referenced

def copy_meta(src: TensorProto, dst: TensorProto) -> None:
    """Copy every field of ``src`` into ``dst`` except ``raw_data`` (never read, never copied)."""
    for fd in src.DESCRIPTOR.fields:
        if fd.name == "raw_data":
            continue
        _copy_field(src, dst, fd, keep_below=0, stripped=None)


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
    for dst in all_tensors(probe):
        if is_referenced(dst):
            # its file and size were checked where it was loaded (onnxlr.referenced)
            dst.ClearField("data_location")
            del dst.external_data[:]
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
