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
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path

import onnx
from onnx import external_data_helper

from onnxlr.errors import OnnxlrError

logger = logging.getLogger(__name__)

#: Protobuf cannot serialise a single message above 2 GiB; bigger models go to external data.
PROTOBUF_LIMIT = 2**31 - 1
#: Leave head room under the protobuf limit for the graph structure itself.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def _external_tensors(model: onnx.ModelProto):
    return [t for t in external_data_helper._get_all_tensors(model)
            if external_data_helper.uses_external_data(t)]


def check_external_location(location: str, base_dir: Path, *, what: str) -> Path:
    """Return the resolved path of an external-data location, or refuse it.

    Args:
        location: the ``location`` entry of a tensor's external data.
        base_dir: the folder of the model file; data must stay inside it.
        what: names the model file or tensor in the error message.
    """
    if not location:
        raise OnnxlrError(f"{what}: external data with an empty location")
    loc = Path(location)
    if loc.is_absolute() or location.startswith(("/", "\\")) or ":" in location:
        raise OnnxlrError(f"{what}: external data location {location!r} is absolute; refused")
    if ".." in loc.parts or ".." in location.replace("\\", "/").split("/"):
        raise OnnxlrError(f"{what}: external data location {location!r} contains '..'; refused")
    base = base_dir.resolve()
    target = base / loc
    # Check every component for a symlink, not only the last one.
    probe = base
    for part in loc.parts:
        probe = probe / part
        if probe.is_symlink():
            raise OnnxlrError(f"{what}: external data location {location!r} is a symlink; refused")
    resolved = target.resolve()
    if base not in resolved.parents:
        raise OnnxlrError(f"{what}: external data location {location!r} resolves outside "
                          f"the model's folder; refused")
    if resolved.exists() and resolved.is_file() and os.stat(resolved).st_nlink > 1:
        raise OnnxlrError(f"{what}: external data file {location!r} is a hard link; refused")
    return resolved


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX model with its external data, refusing unsafe locations.

    Raises:
        OnnxlrError: missing/unreadable file, not ONNX, unsafe external data,
            or a model that fails ``onnx.checker``.
    """
    path = Path(path)
    if not path.exists():
        raise OnnxlrError(f"{path}: no such file")
    if not path.is_file():
        raise OnnxlrError(f"{path}: not a regular file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise OnnxlrError(f"{path}: cannot read ({exc.strerror})") from None
    if not data:
        raise OnnxlrError(f"{path}: empty file, not an ONNX model")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception:  # protobuf raises DecodeError or RuntimeError depending on backend
        raise OnnxlrError(f"{path}: not an ONNX model (protobuf parse failed: truncated or "
                          f"not a model file)") from None
    if not model.HasField("graph") or not model.opset_import:
        raise OnnxlrError(f"{path}: not an ONNX model (no graph or no opset import)")
    base_dir = path.parent
    for tensor in _external_tensors(model):
        info = external_data_helper.ExternalDataInfo(tensor)
        resolved = check_external_location(info.location, base_dir,
                                           what=f"{path}: tensor '{tensor.name}'")
        if not resolved.is_file():
            raise OnnxlrError(f"{path}: tensor '{tensor.name}': external data file "
                              f"{info.location!r} is missing")
    if _external_tensors(model):
        try:
            external_data_helper.load_external_data_for_model(model, str(base_dir))
        except Exception as exc:
            raise OnnxlrError(f"{path}: cannot load external data ({exc})") from None
    check_model(model, what=str(path))
    return model


def check_model(model: onnx.ModelProto, *, what: str) -> None:
    """Run ``onnx.checker`` and turn its failure into one readable line."""
    try:
        if model.ByteSize() > PROTOBUF_LIMIT:
            # The in-memory checker cannot take >2 GB; check the structure without weights.
            stripped = onnx.ModelProto()
            stripped.CopyFrom(model)
            for t in external_data_helper._get_all_tensors(stripped):
                t.ClearField("raw_data")
            onnx.checker.check_model(stripped)
        else:
            onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid model"
        raise OnnxlrError(f"{what}: invalid ONNX model: {first}") from None


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when two paths name the same file (also through links)."""
    a, b = Path(a), Path(b)
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


@contextmanager
def _signals_as_interrupt():
    """Turn SIGTERM into KeyboardInterrupt while writing, so cleanup runs."""
    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt(f"signal {signum}")
    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not in the main thread: nothing to install
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *,
               protect: list[str | os.PathLike] = (), external_data: bool | None = None) -> None:
    """Save atomically; models above ~1.8 GB (or when asked) get external data.

    The external data file is ``<name>.data`` in the output's folder and is
    moved into place before the model that refers to it.

    Args:
        model: the model to write (not modified).
        path: destination ``.onnx`` path.
        protect: paths that must never be overwritten (the input model).
        external_data: force external data on/off; ``None`` decides by size.
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
    if external_data is None:
        external_data = model.ByteSize() > EXTERNAL_DATA_THRESHOLD
    data_name = path.name + ".data"
    if external_data:
        check_external_location(data_name, folder, what=str(path))
        for p in protect:
            if same_file(folder / data_name, p):
                raise OnnxlrError(f"{path}: its external data file would overwrite the input")
    tmp_dir = Path(tempfile.mkdtemp(prefix=".onnxlr-tmp-", dir=folder))
    try:
        with _signals_as_interrupt():
            tmp_model = tmp_dir / path.name
            to_write = model
            if external_data:
                to_write = onnx.ModelProto()
                to_write.CopyFrom(model)
                onnx.save_model(to_write, str(tmp_model), save_as_external_data=True,
                                all_tensors_to_one_file=True, location=data_name,
                                size_threshold=1024)
            else:
                onnx.save_model(to_write, str(tmp_model))
            for f in (tmp_model,) + ((tmp_dir / data_name,) if external_data else ()):
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
            if external_data:
                os.replace(tmp_dir / data_name, folder / data_name)
            os.replace(tmp_model, path)
    except OSError as exc:
        raise OnnxlrError(f"{path}: cannot write ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    logger.info("wrote %s%s", path, " (+ external data)" if external_data else "")
