"""ONNX Runtime room: make feeds, build sessions, compare outputs, time models.

onnxlr only trusts a factorised model once ONNX Runtime has run it next to the
original on the same inputs, so everything that touches ORT lives here, behind a
few small functions. ``onnxruntime`` is imported lazily (inside functions) so
that ``onnxlr inspect`` works without it installed. Latency is measured with
the sessions interleaved (A, B, A, B, ...) so that drift of the machine (clock
boost, thermal throttling, noisy neighbours) hits every model alike.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import onnx
from google.protobuf import message

from onnxlr.errors import OnnxlrError

logger = logging.getLogger(__name__)

__all__ = [
    "Comparison", "LatencyComparison", "LatencyStats", "OutputComparison",
    "compare_outputs", "interleaved_latency", "make_inputs", "make_session",
    "parse_input_shapes", "providers_for", "run", "session_options",
]

_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
_OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
               "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}
_INT_HIGH = 4  # random integer feeds are drawn from [0, _INT_HIGH): valid indices for tiny tables
#: Largest random input onnxlr generates (elements): 2**31 float32 values are already 8 GiB.
MAX_INPUT_ELEMENTS = 2**31


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise OnnxlrError(
            "onnxruntime is not installed: pip install 'onnxlr[cpu]' (or 'onnxlr[gpu]')") from None
    return onnxruntime


def _ort_message(exc: BaseException) -> str:
    """First line of an ORT error, without the ``[ONNXRuntimeError] : 1 : FAIL :`` prefix."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if text.startswith("[ONNXRuntimeError]"):
        text = text.split(" : ", 3)[-1]
    return text


def _is_ort_error(exc: BaseException) -> bool:
    return type(exc).__module__.startswith("onnxruntime")


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


def _feedable_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in inits]


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
    inputs = _feedable_inputs(model)
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


def providers_for(name: str) -> list:
    """Execution providers for ``cpu``, ``cuda`` or ``tensorrt``, most preferred first.

    GPU choices keep fallbacks (CUDA, CPU) for nodes the first provider cannot run.

    Raises:
        OnnxlrError: unknown name, or the provider is not in this ORT build.
    """
    key = name.lower()
    if key not in _PROVIDERS:
        raise OnnxlrError(f"unknown provider {name!r}: choose one of {', '.join(_PROVIDERS)}")
    providers = _PROVIDERS[key]
    available = _ort().get_available_providers()
    if providers[0] not in available:
        raise OnnxlrError(f"provider {name!r} needs {providers[0]}, which this onnxruntime "
                          f"does not have (available: {', '.join(available)}): "
                          "pip install 'onnxlr[gpu]'")
    return list(providers)


def session_options(threads: int | None = None, opt_level: str = "all") -> Any:
    """``ort.SessionOptions`` with ``threads`` intra-op threads and a graph optimisation level.

    Args:
        threads: intra-op thread count; ``None`` lets ORT choose.
        opt_level: ``disable``, ``basic``, ``extended`` or ``all``.
    """
    ort = _ort()
    if opt_level not in _OPT_LEVELS:
        raise OnnxlrError(f"unknown optimisation level {opt_level!r}: "
                          f"choose one of {', '.join(_OPT_LEVELS)}")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPT_LEVELS[opt_level])
    if threads is not None:
        if threads < 1:
            raise OnnxlrError(f"--threads must be at least 1, got {threads}")
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3  # errors only: ORT warnings would drown onnxlr's own output
    return opts


#: A ModelProto whose initializers hold at least this many bytes is not serialised for ONNX
#: Runtime (protobuf stops at 2 GB, and the serialised copy would double the memory): its
#: large initializers are handed over from memory instead (:func:`_in_memory`).
IN_MEMORY_BYTES = 1 << 30
#: Initializers of at least this many bytes are the ones handed over from memory.
IN_MEMORY_TENSOR = 1 << 16
IN_MEMORY_LOCATION = "onnxlr-in-memory"


def _initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def _copy_fields(src, dst, *, skip: str) -> None:
    """Copy every set field of one protobuf message into another, but ``skip``."""
    for field, value in src.ListFields():
        if field.name == skip:
            continue
        if hasattr(value, "extend") and not hasattr(value, "CopyFrom"):   # repeated
            getattr(dst, field.name).extend(value)
        elif hasattr(value, "CopyFrom"):
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)


def _in_memory(model: onnx.ModelProto, opts) -> tuple[bytes, list]:
    """The model serialised without its large initializers' bytes, which go to ORT as
    OrtValues over the proto's own buffers (``SessionOptions.add_external_initializers``:
    no copy on this side; ORT keeps the one copy a session needs). Each such initializer
    stays in the skeleton as an external-data reference of the same name, type and shape,
    which is what that API replaces."""
    from onnx import helper as onnx_helper
    ort = _ort()
    skeleton = onnx.ModelProto()
    _copy_fields(model, skeleton, skip="graph")
    _copy_fields(model.graph, skeleton.graph, skip="initializer")
    names, values, arrays = [], [], []
    for t in model.graph.initializer:
        if len(t.raw_data) < IN_MEMORY_TENSOR or t.data_location == onnx.TensorProto.EXTERNAL:
            skeleton.graph.initializer.append(t)
            continue
        dtype = onnx_helper.tensor_dtype_to_np_dtype(t.data_type)
        array = np.frombuffer(t.raw_data, dtype=dtype).reshape(tuple(t.dims))
        ref = skeleton.graph.initializer.add()
        ref.name, ref.data_type = t.name, t.data_type
        ref.dims.extend(t.dims)
        ref.data_location = onnx.TensorProto.EXTERNAL
        entry = ref.external_data.add()
        entry.key, entry.value = "location", IN_MEMORY_LOCATION
        names.append(t.name)
        values.append(ort.OrtValue.ortvalue_from_numpy(array))
        arrays.append(array)
    if names:
        opts.add_external_initializers(names, values)
    return skeleton.SerializeToString(), [arrays, values]


def make_session(model: onnx.ModelProto | str | bytes | os.PathLike, *, provider: str = "cpu",
                 threads: int | None = None, opt_level: str = "all") -> Any:
    """An ``ort.InferenceSession`` for a model.

    Args:
        model: a ModelProto (serialised here; one whose initializers hold 1 GB or more,
            over 2 GB included, hands them to ORT from memory instead), serialised
            bytes, or a path.
        provider: see :func:`providers_for`.
        threads: see :func:`session_options`.
        opt_level: see :func:`session_options`.

    Raises:
        OnnxlrError: ORT cannot load the model (e.g. unknown op or domain), or
            the requested provider silently fell back to another one.
    """
    providers = providers_for(provider)
    opts = session_options(threads, opt_level)
    keep_alive = None
    if isinstance(model, onnx.ModelProto):
        what = f"model {model.graph.name or '(unnamed)'!r}"
        if _initializer_bytes(model) >= IN_MEMORY_BYTES:
            source, keep_alive = _in_memory(model, opts)
        else:
            try:
                source = model.SerializeToString()
            except (ValueError, message.Error):  # protobuf refuses messages over 2 GB
                source, keep_alive = _in_memory(model, opts)
    elif isinstance(model, (bytes, bytearray)):
        what, source = "model bytes", bytes(model)
    else:
        source = os.fspath(model)
        what = f"model {source}"
        if not os.path.isfile(source):
            raise OnnxlrError(f"model file {source} does not exist")
    try:
        session = _ort().InferenceSession(source, sess_options=opts, providers=providers)
    except Exception as exc:  # ORT raises its own pybind11 exception types
        if not _is_ort_error(exc):
            raise
        raise OnnxlrError(f"onnxruntime cannot load {what}: {_ort_message(exc)}") from None
    session._onnxlr_weights = keep_alive  # noqa: SLF001 (the arrays ORT was handed)
    if session.get_providers()[0] != providers[0]:
        raise OnnxlrError(f"onnxruntime could not start {providers[0]} for {what} "
                          f"(it fell back to {session.get_providers()[0]}): check the GPU libraries")
    return session


def _runner(session: Any, feeds: dict[str, np.ndarray], *, device_resident: bool = False
            ) -> Callable[[], list]:
    """A zero-argument callable running ``session`` on ``feeds``.

    With ``device_resident`` on a GPU provider (CUDA, TensorRT), inputs are copied to
    the device once and inputs and outputs are bound there (ORT I/O binding), so a
    timed call measures the model, not host↔device copies.
    """
    gpu = session.get_providers()[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
    if not (device_resident and gpu):
        return lambda: session.run(None, feeds)
    ort = _ort()
    binding = session.io_binding()
    for name, value in feeds.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
    for out in session.get_outputs():
        binding.bind_output(out.name, "cuda", 0)

    def call() -> list:
        session.run_with_iobinding(binding)
        return binding.get_outputs()
    return call


def run(session: Any, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a session; returns output name to array.

    Raises:
        OnnxlrError: ORT rejects the feeds or fails while running.
    """
    names = [o.name for o in session.get_outputs()]
    try:
        values = _runner(session, feeds)()
    except Exception as exc:
        # the binding raises a plain RuntimeError for feeds it cannot convert (e.g. bfloat16)
        if not (_is_ort_error(exc) or type(exc) is RuntimeError):
            raise
        raise OnnxlrError(f"onnxruntime failed to run the model: {_ort_message(exc)}") from None
    return dict(zip(names, (np.asarray(v) for v in values)))


@dataclass
class OutputComparison:
    """Error of one candidate output against the reference.

    For float outputs ``rel_l2 = ||a-b|| / ||a||`` (float64; the plain ``||b||``
    when the reference is all zeros), ``cosine`` of the flattened arrays (1.0
    when both are zero, 0.0 when one is) and ``max_abs = max|a-b|``; any
    non-finite mismatch gives ``inf`` errors and cosine 0.0. For non-float
    outputs (labels, strings) ``rel_l2`` is the fraction of mismatching
    elements, ``cosine = 1 - rel_l2`` and ``max_abs`` is ``max|a-b|`` (1.0/0.0
    for strings). ``top1_agreement`` is the fraction of rows with the same
    argmax, only for float outputs shaped like class scores ``[N, C]``, C > 1
    (size-1 dims after the first are ignored); otherwise ``None``.
    """

    name: str
    rel_l2: float
    max_abs: float
    cosine: float
    top1_agreement: float | None


@dataclass
class Comparison:
    """Per-output errors and the bound (``max_error``) they were checked against."""

    outputs: list[OutputComparison]
    max_error: float | None

    @property
    def worst_rel_l2(self) -> float:
        """Largest ``rel_l2`` over the outputs (0.0 when there are none)."""
        return max((o.rel_l2 for o in self.outputs), default=0.0)

    def __bool__(self) -> bool:
        """True when there is no bound or every output's ``rel_l2`` is within it (NaN fails)."""
        if self.max_error is None:
            return True
        return all(o.rel_l2 <= self.max_error for o in self.outputs)

    def to_dict(self) -> dict:
        """JSON-ready dict (floats may be ``inf``)."""
        return {"max_error": self.max_error, "worst_rel_l2": self.worst_rel_l2, "passed": bool(self),
                "outputs": [asdict(o) for o in self.outputs]}


def class_rows(a: np.ndarray) -> np.ndarray | None:
    """A float output shaped like class scores as [N, C] (C > 1, size-1 dims ignored), else None."""
    a = np.asarray(a)
    if a.dtype.kind != "f" or a.ndim < 2:
        return None
    rest = [d for d in a.shape[1:] if d != 1]
    if len(rest) != 1 or rest[0] < 2:
        return None
    return a.reshape(a.shape[0], rest[0])


def _compare_one(name: str, a: np.ndarray, b: np.ndarray) -> OutputComparison:
    if a.dtype.kind != "f" or b.dtype.kind != "f":
        mismatch = a != b
        frac = float(np.mean(mismatch)) if a.size else 0.0
        if a.dtype.kind in "biuf" and b.dtype.kind in "biuf":
            max_abs = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)), initial=0.0))
        else:
            max_abs = float(bool(np.any(mismatch)))
        return OutputComparison(name, frac, max_abs, 1.0 - frac, None)
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    rows_a, rows_b = class_rows(a), class_rows(b)
    top1 = None
    if rows_a is not None and rows_b is not None and rows_a.shape[0] > 0:
        top1 = float(np.mean(np.argmax(rows_a, axis=1) == np.argmax(rows_b, axis=1)))
    if not (np.all(np.isfinite(a64)) and np.all(np.isfinite(b64))):
        if np.array_equal(a64, b64, equal_nan=True):
            return OutputComparison(name, 0.0, 0.0, 1.0, top1)
        return OutputComparison(name, math.inf, math.inf, 0.0, top1)
    diff = a64 - b64
    na, nb, nd = (float(np.linalg.norm(x)) for x in (a64, b64, diff))
    rel = nd / na if na > 0 else nd
    if na == 0 or nb == 0:
        cosine = 1.0 if na == nb else 0.0
    else:
        cosine = float(np.dot(a64, b64)) / (na * nb)
    max_abs = float(np.max(np.abs(diff), initial=0.0))
    return OutputComparison(name, rel, max_abs, min(1.0, max(-1.0, cosine)), top1)


def compare_outputs(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray],
                    max_error: float | None = None) -> Comparison:
    """Compare every reference output with the candidate's output of the same name.

    Args:
        reference: outputs of the original model (from :func:`run`).
        candidate: outputs of the factorised model.
        max_error: bound on each output's ``rel_l2``; ``None`` checks nothing.

    Raises:
        OnnxlrError: the candidate lacks an output or its shape differs.
    """
    outputs = []
    for name, ref in reference.items():
        if name not in candidate:
            raise OnnxlrError(f"candidate model has no output {name!r} "
                              f"(it has {', '.join(candidate) or 'none'})")
        a, b = np.asarray(ref), np.asarray(candidate[name])
        if a.shape != b.shape:
            raise OnnxlrError(f"output {name!r} has shape {b.shape} in the candidate "
                              f"but {a.shape} in the reference")
        outputs.append(_compare_one(name, a, b))
    return Comparison(outputs, max_error)


@dataclass
class LatencyStats:
    """Latency of one model over the timed rounds, in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    iterations: int


@dataclass
class LatencyComparison:
    """Latencies of several models timed together.

    Attributes:
        stats: one per session, in the order given.
        speedups: per session, the median over rounds of ``t_first / t_i``
            (so the first is 1.0 and >1 means faster than the first).
        spreads: per session, (p10, p90) of those per-round ratios: how far one round
            can be from the median.
        intervals: per session, a 95% confidence interval of that median (order
            statistics of the rounds, distribution-free): when it holds 1, "faster" or
            "slower" is within the noise.
    """

    stats: list[LatencyStats]
    speedups: list[float]
    spreads: list[tuple[float, float]] = field(default_factory=list)
    intervals: list[tuple[float, float]] = field(default_factory=list)


def interleaved_latency(sessions: list, feeds: dict | list[dict], *, warmup: int = 5,
                        iterations: int = 50, max_seconds: float | None = None) -> LatencyComparison:
    """Time sessions round-robin (A, B, C, A, B, C, ...) so machine drift cancels.

    Args:
        sessions: ORT sessions to time.
        feeds: one feed dict for all sessions, or one per session.
        warmup: untimed runs per session before timing.
        iterations: timed rounds (each round runs every session once).
        max_seconds: stop after this much timed wall time, but only once at
            least 5 rounds (or ``iterations``, if fewer) are done.

    Raises:
        OnnxlrError: no sessions, a feeds list of the wrong length, or ``iterations < 1``.
    """
    if not sessions:
        raise OnnxlrError("no sessions to time")
    feed_list = list(feeds) if isinstance(feeds, (list, tuple)) else [feeds] * len(sessions)
    if len(feed_list) != len(sessions):
        raise OnnxlrError(f"got {len(feed_list)} feed dicts for {len(sessions)} sessions")
    if iterations < 1:
        raise OnnxlrError(f"iterations must be at least 1, got {iterations}")
    runners = [_runner(s, f, device_resident=True) for s, f in zip(sessions, feed_list)]
    for runner in runners:
        for _ in range(max(0, warmup)):
            runner()
    times = np.empty((iterations, len(runners)))
    start, rounds = time.perf_counter(), 0
    for r in range(iterations):
        for i, runner in enumerate(runners):
            t0 = time.perf_counter()
            runner()
            times[r, i] = time.perf_counter() - t0
        rounds = r + 1
        if max_seconds is not None and rounds >= 5 and time.perf_counter() - start > max_seconds:
            break
    times = times[:rounds] * 1e3
    logger.debug("timed %d rounds of %d sessions", rounds, len(runners))
    stats = [LatencyStats(float(np.median(t)), float(np.percentile(t, 10)), float(np.percentile(t, 90)),
                          float(np.mean(t)), rounds) for t in times.T]
    ratios = [np.sort(times[:, 0] / np.maximum(times[:, i], 1e-9)) for i in range(len(runners))]
    # ranks of the median's 95% interval: the binomial(n, 1/2) quantiles, normal approximation
    k = max(0, int(np.floor(rounds / 2 - 0.98 * math.sqrt(rounds))))
    return LatencyComparison(stats, [float(np.median(r)) for r in ratios],
                             [(float(np.percentile(r, 10)), float(np.percentile(r, 90)))
                              for r in ratios],
                             [(float(r[k]), float(r[rounds - 1 - k])) for r in ratios])
