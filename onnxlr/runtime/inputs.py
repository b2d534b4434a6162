"""Feeds for a model: given shapes, an inputs file, or seeded random values that stay valid.

Random inputs must not make a model fail or degenerate: dynamic dims get a default (or the
``--input-shape`` given), integer inputs stay inside the Gather tables they index, attention
masks are all ones and token-type ids zeros. An inputs file is validated like a calibration
file (headers before data, names, ranks, fixed dims).
"""
from __future__ import annotations

import logging
import math

import numpy as np
import onnx

from onnxlr.errors import OnnxlrError
from onnxlr.graph import feedable_inputs

logger = logging.getLogger(__name__)

_INT_HIGH = 4  # random integer feeds are drawn from [0, _INT_HIGH): valid indices for tiny tables
#: Largest random input onnxlr generates (elements): 2**31 float32 values are already 8 GiB.
MAX_INPUT_ELEMENTS = 2**31


def parse_input_shapes(specs: list[str]) -> dict[str, tuple[int, ...]]:
    """Parse ``--input-shape`` values such as ``"input:1x3x224x224"``.

    Args:
        specs: strings ``NAME:D0xD1x...`` with positive integer dims; the name
            may itself contain ``:`` (the last one separates the dims).

    Returns:
        Input name to shape.

    Raises:
        OnnxlrError: a malformed spec or a name given twice.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        name, sep, dims = spec.rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            # 1x3x224x224 (onnxlr, trtexec) or 1,3,224,224 (onnxsim, onnxslim, Polygraphy)
            shape = tuple(int(d) for d in dims.lower().replace(",", "x").split("x"))
            if any(d <= 0 for d in shape):
                raise ValueError
        except ValueError:
            raise OnnxlrError(f"bad input shape {spec!r}: expected NAME:DIMS "
                              "such as input:1x3x224x224 or input:1,3,224,224") from None
        if name in shapes:
            raise OnnxlrError(f"input shape for {name!r} given twice ({spec!r})")
        shapes[name] = shape
    return shapes


_feedable_inputs = feedable_inputs  # its old name here


#: Value of a dynamic non-batch dim (a sequence length, mostly) when neither --input-shape nor
#: another input with the same symbolic dim pins it.
DEFAULT_DIM = 128


def _resolve_shape(vi: onnx.ValueInfoProto, given: tuple[int, ...] | None, batch: int,
                   symbols: dict[str, int], defaulted: dict[str, int]) -> tuple[int, ...]:
    """The shape of one input: ``given`` (checked), else its fixed dims, ``batch`` for a dynamic
    leading dim and, for other dynamic dims, the value another input pins for the same symbol
    or :data:`DEFAULT_DIM` (recorded in ``defaulted``)."""
    tt = vi.type.tensor_type
    dims = list(tt.shape.dim) if tt.HasField("shape") else None
    if given is not None:
        if dims is not None and len(dims) != len(given):
            raise OnnxlrError(f"input {vi.name!r} has rank {len(dims)} "
                              f"but --input-shape gives {len(given)} dims")
        for axis, (d, g) in enumerate(zip(dims or [], given)):
            if d.HasField("dim_value") and d.dim_value != g:
                raise OnnxlrError(f"input {vi.name!r} has fixed dim {d.dim_value} at axis {axis}, "
                                  f"but --input-shape gives {g}")
        return given
    if dims is None:
        raise OnnxlrError(f"input {vi.name!r} has no shape in the model: "
                          f"give --input-shape {vi.name}:DIMS")
    shape: list[int] = []
    for axis, d in enumerate(dims):
        if d.HasField("dim_value") and d.dim_value > 0:
            shape.append(d.dim_value)
        elif d.dim_param and d.dim_param in symbols:
            shape.append(symbols[d.dim_param])
        elif axis == 0:
            shape.append(batch)
        else:
            label = d.dim_param or f"{vi.name}[{axis}]"
            defaulted[label] = DEFAULT_DIM
            shape.append(DEFAULT_DIM)
        if d.dim_param:
            symbols.setdefault(d.dim_param, shape[-1])
    return tuple(shape)


def _symbols_from(inputs: list[onnx.ValueInfoProto], shapes: dict[str, tuple[int, ...]]
                  ) -> dict[str, int]:
    """Symbolic dim → value, from the shapes the user gave (``seq`` of input_ids sets the
    attention mask's ``seq`` too)."""
    symbols: dict[str, int] = {}
    for vi in inputs:
        given = shapes.get(vi.name)
        tt = vi.type.tensor_type
        if given is None or not tt.HasField("shape") or len(tt.shape.dim) != len(given):
            continue
        for d, g in zip(tt.shape.dim, given):
            if d.dim_param:
                symbols.setdefault(d.dim_param, g)
    return symbols


#: Ops that pass integer values through unchanged (only shape or dtype changes), on the way
#: from a graph input to the Gather that uses it as indices.
_VALUE_PRESERVING = {"Identity", "Cast", "Unsqueeze", "Squeeze", "Reshape", "Flatten",
                     "Transpose", "Expand", "Slice"}
#: A Gather table at most this many rows is a segment/type table: type-id inputs get zeros.
_SMALL_TABLE = 16


def _gather_bounds(model: onnx.ModelProto, names: list[str]) -> dict[str, tuple[int, str]]:
    """For each input in ``names`` that reaches the indices of a Gather (through value-preserving
    ops), the fewest rows among the tables it indexes and the node that has them."""
    rows_of = {t.name: (list(t.dims), t.name) for t in model.graph.initializer}
    for n in model.graph.node:  # tables stored as Constant nodes
        if n.op_type == "Constant" and n.output:
            for a in n.attribute:
                if a.name == "value":
                    rows_of[n.output[0]] = (list(a.t.dims), n.output[0])
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    bounds: dict[str, tuple[int, str]] = {}
    for name in names:
        seen, stack = {name}, [name]
        while stack:
            value = stack.pop()
            for node in consumers.get(value, []):
                if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == value:
                    table = rows_of.get(node.input[0])
                    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                    if table and -len(table[0]) <= axis < len(table[0]):
                        rows = table[0][axis]
                        if name not in bounds or rows < bounds[name][0]:
                            bounds[name] = (rows, node.name or node.output[0])
                elif node.op_type in _VALUE_PRESERVING and node.input[0] == value:
                    for out in node.output:
                        if out and out not in seen:
                            seen.add(out)
                            stack.append(out)
    return bounds


def _is_mask(name: str) -> bool:
    return "mask" in name.lower()


def _is_type_ids(name: str) -> bool:
    return "type" in name.lower()


def _np_dtype(vi: onnx.ValueInfoProto) -> np.dtype:
    if not vi.type.HasField("tensor_type"):
        raise OnnxlrError(f"input {vi.name!r} is not a tensor; onnxlr can only feed tensor inputs")
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
    except (KeyError, TypeError, ValueError):
        dtype = onnx.TensorProto.DataType.Name(vi.type.tensor_type.elem_type)
        raise OnnxlrError(f"input {vi.name!r} has unsupported dtype {dtype}") from None


def _random(rng: np.random.Generator, name: str, dtype: np.dtype, shape: tuple[int, ...],
            high: int = _INT_HIGH) -> np.ndarray:
    count = math.prod(shape)
    if count > MAX_INPUT_ELEMENTS:
        # refuse before allocating: a declared shape is untrusted, an OOM kill is no error message
        raise OnnxlrError(f"input {name!r} would have {count} elements (shape "
                          f"{'x'.join(map(str, shape))}), over onnxlr's limit of "
                          f"{MAX_INPUT_ELEMENTS}: give a smaller --input-shape or "
                          f"--inputs FILE.npz")
    if dtype.kind == "f":
        return np.asarray(rng.standard_normal(shape)).astype(dtype)
    if dtype.kind in "iu":
        return np.asarray(rng.integers(0, high, size=shape)).astype(dtype)
    if dtype.kind == "b":
        return np.asarray(rng.random(shape) < 0.5)  # a 0-d comparison gives a numpy scalar
    raise OnnxlrError(f"input {name!r} has dtype {dtype} that onnxlr cannot generate: "
                      "pass --inputs FILE.npz")


def make_inputs(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]] | None = None, *,
                batch: int = 1, seed: int = 0, npz: str | None = None,
                notes: list[str] | None = None) -> dict[str, np.ndarray]:
    """Feeds for the graph inputs that are not initializers.

    Random feeds are made to be valid for the model, so that verification can run without
    real inputs: an integer input that reaches the indices of a ``Gather`` (token ids,
    position ids) is drawn inside the smallest table it indexes; an input named like a mask
    is all ones, a type-id input (``token_type_ids``) indexing a small table all zeros.

    Args:
        model: the model (external data need not be loaded; only inputs and table shapes
            are read).
        shapes: shapes per input name (from :func:`parse_input_shapes`); these win, and
            their symbolic dims (``seq``) hold for the other inputs too.
        batch: value for an unknown leading (batch) dim.
        seed: seed for the random feeds. Floats are standard normal, other integers are
            drawn from ``[0, 4)``, bools are fair coin flips.
        npz: optional ``.npz`` file with one array per input name; used instead
            of random data (dtype, rank and fixed dims are checked).
        notes: when given, one line per choice made for random feeds (a defaulted dim,
            an index range, a mask) is appended, for the report.

    Returns:
        Input name to array, in graph input order.

    Raises:
        OnnxlrError: unknown input names in ``shapes``, an input without a shape, or a
            bad/incomplete ``npz``.
    """
    shapes = dict(shapes or {})
    inputs = feedable_inputs(model)
    names = [v.name for v in inputs]
    unknown = sorted(set(shapes) - set(names))
    if unknown:
        raise OnnxlrError(f"--input-shape names unknown input(s) {', '.join(map(repr, unknown))}; "
                          f"model inputs: {', '.join(names) or '(none)'}")
    if npz is not None:
        return _load_npz(npz, inputs, shapes)
    notes = notes if notes is not None else []
    rng = np.random.default_rng(seed)
    symbols, defaulted = _symbols_from(inputs, shapes), {}
    dtypes = {v.name: _np_dtype(v) for v in inputs}
    bounds = _gather_bounds(model, [n for n in names if dtypes[n].kind in "iu"])
    feeds: dict[str, np.ndarray] = {}
    for v in inputs:
        dtype = dtypes[v.name]
        shape = _resolve_shape(v, shapes.get(v.name), batch, symbols, defaulted)
        feeds[v.name] = _random(rng, v.name, dtype, shape,
                                high=bounds[v.name][0] if v.name in bounds else _INT_HIGH)
        if _is_mask(v.name):
            feeds[v.name] = np.ones(shape, dtype)
            notes.append(f"{v.name}: ones (a mask)")
        elif v.name in bounds:
            rows, gather = bounds[v.name]
            if _is_type_ids(v.name) and rows <= _SMALL_TABLE:
                feeds[v.name] = np.zeros(shape, dtype)
                notes.append(f"{v.name}: zeros (type ids; Gather {gather!r} has {rows} rows)")
            else:
                notes.append(f"{v.name}: random in [0, {rows}) (Gather {gather!r}, "
                             f"the smallest table it indexes)")
    for label, value in defaulted.items():
        notes.insert(0, f"dynamic dim {label!r} set to {value} (the default; "
                        f"--input-shape to change)")
        logger.info("dynamic dim %r set to %d: give --input-shape to change it", label, value)
    return feeds


def _load_npz(path: str, inputs: list[onnx.ValueInfoProto],
              shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    from onnxlr.arrays import load_npz
    arrays = load_npz(path, "inputs file")  # headers checked before anything is allocated
    missing = [v.name for v in inputs if v.name not in arrays]
    if missing:
        raise OnnxlrError(f"inputs file {path} lacks array(s) for input(s) "
                          f"{', '.join(map(repr, missing))}; it has {', '.join(arrays) or '(none)'}")
    feeds: dict[str, np.ndarray] = {}
    for v in inputs:
        arr, dtype = arrays[v.name], _np_dtype(v)
        if arr.dtype != dtype:
            raise OnnxlrError(f"inputs file {path}: {v.name!r} is {arr.dtype} "
                              f"but the model expects {dtype}")
        if v.name in shapes and tuple(arr.shape) != shapes[v.name]:
            raise OnnxlrError(f"inputs file {path}: {v.name!r} has shape {arr.shape}, "
                              f"--input-shape says {shapes[v.name]}")
        tt = v.type.tensor_type
        if tt.HasField("shape"):
            dims = tt.shape.dim
            if arr.ndim != len(dims):
                raise OnnxlrError(f"inputs file {path}: {v.name!r} has rank {arr.ndim}, "
                                  f"the model expects {len(dims)}")
            for axis, (d, n) in enumerate(zip(dims, arr.shape)):
                if d.HasField("dim_value") and d.dim_value > 0 and d.dim_value != n:
                    raise OnnxlrError(f"inputs file {path}: {v.name!r} has {n} at axis {axis}, "
                                      f"the model expects {d.dim_value}")
        feeds[v.name] = arr
    extra = sorted(set(arrays) - set(feeds) - {"label"})  # labels feed the accuracy metric
    if extra:
        logger.warning("inputs file %s: ignoring arrays that are not model inputs: %s",
                       path, ", ".join(extra))
    return feeds
