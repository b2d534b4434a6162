"""Loading and saving models without losing anything or trusting the file.

Why this module exists:
- External data of an untrusted model may name any path; ONNX's own loader
  followed ``..``, absolute paths and symlinks in the past (CVE-2022-25882,
  CVE-2024-27318, CVE-2025-51480). We check every location before reading and
  before writing: it must be a plain relative name resolving inside the model's
  folder, not a symlink, not a hard link.
- Writes are atomic: everything goes into a temporary folder beside the target
  and is moved into place with ``os.replace`` only once complete, so a crash or
  Ctrl-C never leaves a half-written model, and the input is never overwritten.
  SIGINT/SIGTERM are held back during the final renames, so a model and its
  external data file are replaced together.
- Memory: external data is read tensor by tensor, exactly the bytes each
  header declares, and written the same way from an untouched model, so a
  model over 2 GB is never held twice (see ``_load_external``/``_write_external``).

The location checks are :mod:`onnxlr.locations` (re-exported here).
"""
from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

import onnx
from onnx import external_data_helper

from onnxlr import referenced, validate
from onnxlr.errors import OnnxlrError
from onnxlr.locations import _open_inside, check_external_location, same_file  # noqa: F401

logger = logging.getLogger(__name__)

#: Protobuf cannot serialise a single message above 2 GiB; bigger models go to external data.
PROTOBUF_LIMIT = 2**31 - 1
#: Leave head room under the protobuf limit for the graph structure itself.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def _external_info(tensor: onnx.TensorProto, what: str) -> tuple[str, int, int | None]:
    """(location, offset, length) of a tensor's external data, refusing malformed entries."""
    entries = {e.key: e.value for e in tensor.external_data}
    try:
        offset = int(entries.get("offset") or 0)
        length = int(entries["length"]) if entries.get("length") else None
    except ValueError:
        raise OnnxlrError(f"{what}: external data offset/length are not integers") from None
    if offset < 0 or (length is not None and length < 0):
        raise OnnxlrError(f"{what}: external data offset/length are negative")
    return entries.get("location", ""), offset, length


_physical_memory = validate.physical_memory

#: A model whose external data holds at least this many bytes keeps its big initializers'
#: bytes in the file (:mod:`onnxlr.referenced`): the proto is then never a copy of them.
REFERENCE_BYTES = 1 << 30
#: ... those of at least this many bytes, and floating-point ones only: integer tensors are
#: shape operands and indices, which shape inference (onnx's and ORT's) needs to read.
REFERENCE_TENSOR = 1 << 16
_WEIGHT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                 onnx.TensorProto.BFLOAT16}


def _load_external(model: onnx.ModelProto, path: Path) -> None:
    """Read every external tensor's bytes, exactly as many as its header declares.

    Not ``onnx.load_external_data_for_model``: that reads "the rest of the file"
    when ``length`` is absent and trusts ``offset``/``length`` over the tensor's
    shape. Here every location is checked, opened without following links,
    must be a regular file with one link, and must hold the declared bytes;
    the total is compared with the machine's memory before anything is read.
    """
    tensors = [t for t in validate.all_tensors(model)
               if external_data_helper.uses_external_data(t)]
    plans, total = [], 0
    for tensor in tensors:
        what = f"{path}: tensor {validate.quote(tensor.name)}"
        location, offset, length = _external_info(tensor, what)
        check_external_location(location, path.parent, what=what)
        need = validate.declared_bytes(tensor)
        if need is None and length is None:
            raise OnnxlrError(f"{what}: external data without a length, of a type whose "
                              f"size onnxlr cannot compute")
        if need is not None and length is not None and length != need:
            raise OnnxlrError(f"{what}: external data length {length} bytes, but its declared "
                              f"shape needs {need}")
        nbytes = need if need is not None else length
        plans.append((tensor, what, location, offset, nbytes))
        total += nbytes
    weights = {t.name for t in model.graph.initializer}
    memory = _physical_memory()
    if memory is not None and total > memory:
        raise OnnxlrError(f"{path}: its external data declares {total} bytes, more than this "
                          f"machine's memory ({memory} bytes); refused")
    by_reference = total >= REFERENCE_BYTES
    for tensor, what, location, offset, nbytes in plans:
        if (by_reference and nbytes >= REFERENCE_TENSOR and tensor.name in weights
                and tensor.data_type in _WEIGHT_TYPES):
            referenced.read_at(path.parent, location, offset, nbytes, what, read=False)
            referenced.mark(tensor, path.parent, offset, nbytes)
            continue
        tensor.raw_data = referenced.read_at(path.parent, location, offset, nbytes, what)
        tensor.ClearField("data_location")  # as if it had always been inline
        del tensor.external_data[:]


def weights_by_reference(model: onnx.ModelProto) -> bool:
    """Whether ``load_model`` left this model's big weights in its file (its external data
    reached :data:`REFERENCE_BYTES`)."""
    return bool(referenced.folders(model))


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX model with its external data, refusing unsafe locations.

    Nodes stored out of topological order (but acyclic) are put in order;
    that changes nothing the model computes.

    Raises:
        OnnxlrError: missing/unreadable file, not ONNX, unsafe or truncated
            external data, a lying tensor header, a broken graph (cycle,
            dangling input, missing initializer), or a model ``onnx.checker`` refuses.
    """
    path = Path(path)
    if not path.exists():
        raise OnnxlrError(f"{path}: no such file")
    if not path.is_file():
        raise OnnxlrError(f"{path}: not a regular file")
    size = path.stat().st_size
    if size == 0:
        raise OnnxlrError(f"{path}: empty file, not an ONNX model")
    if size > PROTOBUF_LIMIT:
        raise OnnxlrError(f"{path}: {size} bytes, over protobuf's 2 GiB limit: not an ONNX "
                          f"model file (big models keep their weights in external data)")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise OnnxlrError(f"{path}: cannot read ({exc.strerror})") from None
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception:  # protobuf raises DecodeError or RuntimeError depending on backend
        raise OnnxlrError(f"{path}: not an ONNX model (protobuf parse failed: truncated or "
                          f"not a model file)") from None
    del data  # the file's bytes and the parsed model need not live side by side
    if not model.HasField("graph") or not model.opset_import:
        raise OnnxlrError(f"{path}: not an ONNX model (no graph or no opset import)")
    _load_external(model, path)
    if validate.sort_nodes(model.graph):
        logger.warning("%s: nodes were not in topological order; sorted them", path)
    check_model(model, what=str(path))
    return model


def check_model(model: onnx.ModelProto, *, what: str) -> None:
    """Tensor sizes, graph structure and ``onnx.checker``, as one readable line on failure.

    See :func:`onnxlr.validate.check_model`; works for models over 2 GB.
    """
    validate.check_model(model, what=what)


@contextmanager
def _handlers(handler, signals):
    """Install ``handler`` for ``signals``, restoring the previous handlers afterwards.

    Yields the previous handlers, or None off the main thread (where Python cannot install any).
    """
    try:
        previous = {s: signal.signal(s, handler) for s in signals}
    except ValueError:
        yield None
        return
    try:
        yield previous
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


@contextmanager
def _signals_as_interrupt():
    """Turn SIGTERM into KeyboardInterrupt while writing, so cleanup runs."""
    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt(f"signal {signum}")
    with _handlers(handler, (signal.SIGTERM,)):
        yield


#: Tensors smaller than this stay inside the .onnx file when saving with external data.
INLINE_BYTES = 1024
#: Offsets of external tensors are multiples of this, so runtimes can map them directly.
ALIGNMENT = 4096


def _write_external(model: onnx.ModelProto, model_path: Path, data_path: Path,
                    location: str) -> None:
    """Write the weights' bytes to ``data_path`` and the rest of the model to ``model_path``.

    Not ``onnx.save_model(save_as_external_data=True)``: that moves the bytes out
    of the model it is given, so callers copy the whole model first (twice the
    memory). Here the model is only read: a copy of its structure gets the
    external references, and each tensor's bytes pass through memory one at a time.
    """
    probe, stripped = validate.light_copy(model, keep_below=INLINE_BYTES)
    offset = 0
    with open(data_path, "wb") as fh:
        for src, dst, size in stripped:
            pad = -offset % ALIGNMENT
            fh.write(b"\0" * pad)
            offset += pad
            fh.write(src.raw_data)
            offset = _point(dst, location, offset, size)
        for dst in validate.all_tensors(probe):  # left in the input's file: copied from there
            if referenced.is_referenced(dst):
                data = referenced.read_bytes(dst)
                pad = -offset % ALIGNMENT
                fh.write(b"\0" * pad)
                offset += pad
                fh.write(data)
                del dst.external_data[:]
                offset = _point(dst, location, offset, len(data))
                del data
        fh.flush()
        os.fsync(fh.fileno())
    _write_proto(probe, model_path)


def _point(tensor: onnx.TensorProto, location: str, offset: int, size: int) -> int:
    """Make ``tensor`` refer to ``size`` bytes at ``offset`` of ``location``; the next offset."""
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(size))):
        tensor.external_data.add(key=key, value=value)
    return offset + size


def _write_proto(model: onnx.ModelProto, path: Path) -> None:
    try:
        data = model.SerializeToString()
    except Exception:  # protobuf refuses messages over 2 GiB (EncodeError/ValueError)
        raise OnnxlrError(f"{path.name}: the model is over protobuf's 2 GiB limit even without "
                          f"its weights; cannot save it") from None
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


@contextmanager
def _signals_deferred():
    """Hold SIGINT/SIGTERM back while the final renames run; they take effect right after.

    Done with Python-level handlers, not ``pthread_sigmask``: a process-directed signal goes
    to any thread that does not block it (ORT and BLAS start threads), and Python then runs
    its handler in the main thread anyway.
    """
    pending: list[int] = []
    previous = None
    try:
        with _handlers(lambda signum, frame: pending.append(signum),
                       (signal.SIGINT, signal.SIGTERM)) as previous:
            yield
    finally:
        handler = previous[pending[0]] if previous and pending else None
        if callable(handler):
            handler(pending[0], None)  # SIGINT's default raises KeyboardInterrupt, as does ours
        elif handler == signal.SIG_DFL:
            os.kill(os.getpid(), pending[0])


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *,
               protect: list[str | os.PathLike] = (), external_data: bool | None = None,
               threshold: int = EXTERNAL_DATA_THRESHOLD) -> None:
    """Save atomically; models above ``threshold`` bytes (or when asked) get external data.

    The external data file is ``<name>.data`` in the output's folder (never
    anywhere else) and is moved into place before the model that refers to it.

    Args:
        model: the model to write (not modified).
        path: destination ``.onnx`` path.
        protect: paths that must never be overwritten (the input model).
        external_data: force external data on/off; ``None`` decides by size.
        threshold: model size in bytes above which ``None`` means external data
            (default ~1.8 GB, under protobuf's 2 GiB limit).
    """
    path = Path(path)
    for p in protect:
        if same_file(path, p):
            raise OnnxlrError(f"{path}: output path is the input model; refusing to overwrite it "
                              f"(choose another -o)")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OnnxlrError(f"{path}: output folder {str(folder)!r} does not exist")
    if path.is_dir():
        raise OnnxlrError(f"{path}: output path is a folder")
    by_reference = False
    for tensor in validate.all_tensors(model):
        if referenced.is_referenced(tensor):
            by_reference = True  # checked at load: its bytes are copied over from its file
        elif external_data_helper.uses_external_data(tensor):
            # writing it as is would hand on a reference to wherever the input pointed
            raise OnnxlrError(f"{path}: tensor {validate.quote(tensor.name)} still refers to "
                              f"external data that was never loaded; refusing to save a "
                              f"reference to another file")
    if external_data is None:
        external_data = by_reference or validate.model_bytes(model) > threshold
    if by_reference and not external_data:
        raise OnnxlrError(f"{path}: the model's weights stay in its input's data file; it is "
                          f"written with external data only")
    data_name = path.name + ".data"
    if external_data:
        check_external_location(data_name, folder, what=str(path))
        for p in protect:
            if same_file(folder / data_name, p):
                raise OnnxlrError(f"{path}: its external data file would overwrite the input")
    # named before it exists, so that a signal arriving while it is created still finds it
    tmp_dir: Path | None = folder / f".onnxlr-tmp-{secrets.token_hex(8)}"
    try:
        with _signals_as_interrupt():  # SIGTERM, too, must run the cleanup below
            try:
                os.mkdir(tmp_dir, 0o700)
            except FileExistsError:  # not ours: never clean it up
                tmp_dir = None
                raise
            tmp_model = tmp_dir / path.name
            if external_data:
                _write_external(model, tmp_model, tmp_dir / data_name, data_name)
            else:
                _write_proto(model, tmp_model)
            with _signals_deferred():  # the data and the model that refers to it move together
                if external_data:
                    os.replace(tmp_dir / data_name, folder / data_name)
                os.replace(tmp_model, path)
    except OSError as exc:
        raise OnnxlrError(f"{path}: cannot write ({exc.strerror or exc})") from None
    finally:
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    logger.info("wrote %s%s", path, " (+ external data)" if external_data else "")
