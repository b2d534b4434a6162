"""ONNX Runtime sessions: providers, options, loading a model, running it.

``onnxruntime`` is imported here only, lazily (inside functions), so that ``onnxlr inspect``
works without it installed; its errors become one-line :class:`OnnxlrError` s.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np
import onnx
from google.protobuf import message

from onnxlr.errors import OnnxlrError

_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
_OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
               "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


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


#: How onnxlr's sessions run, as far as a timing depends on it: part of every timing-cache
#: key, so that timings measured another way are measured again.
TIMING_PROTOCOL = "no spin-waiting"


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
    # No spin-waiting: onnxlr keeps several sessions alive and runs them in turn (A/B timing,
    # the layer timer, the search's checks), and a session's idle threads spinning after its
    # run take the cores from the next one. On 2 cores, the same model timed against itself
    # (A/A) read 0.79-1.27x with spinning and 0.99-1.00x without, and the digits CNN ran at
    # 5-7 ms with spinning beside a second session against 3.3 ms without.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
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
        from onnxlr import referenced
        if referenced.folders(model):  # ORT reads the weights left in their file itself
            model = referenced.for_session(model, opts)
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
