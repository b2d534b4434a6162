"""Weights left in their external data file: a model over 1 GB is held without its weights.

Reading every external tensor into the ModelProto makes the proto one copy of the weights,
and with protobuf's upb backend every later step that builds a new proto (onnx-graphsurgeon's
export, a session's skeleton) or reads ``raw_data`` (a Python ``bytes`` copy) makes another:
a 2.25 GiB model peaked at 11.7 GiB. So :func:`onnxlr.io.load_model` checks the big tensors'
locations and sizes as always, but leaves their bytes in the file and marks each one with
the model's folder (:data:`FOLDER_KEY`). From then on:

- a weight's values are read from the file when a step needs them, one tensor at a time,
  never kept (:func:`read_array`, used by ``graph.constant_value``);
- ONNX Runtime reads the file itself (:func:`for_session`: the marker stripped, the folder
  given as ``session.model_external_initializers_file_folder_path``): its one copy;
- a saved model gets the bytes copied over from the file, tensor by tensor (``io``).

The marker never reaches a written file or ONNX Runtime.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from onnxlr.errors import OnnxlrError
from onnxlr.locations import _open_inside
from onnxlr.validate import all_tensors
from onnxlr.validate.tensors import FOLDER_KEY, is_referenced

#: ORT's session option for external data of a model handed over as bytes.
ORT_FOLDER_OPTION = "session.model_external_initializers_file_folder_path"


def mark(tensor: TensorProto, folder: Path, offset: int, nbytes: int) -> None:
    """Record the checked folder, offset and length on an external tensor."""
    entries = {e.key: e.value for e in tensor.external_data}
    del tensor.external_data[:]
    for key, value in (("location", entries["location"]), ("offset", str(offset)),
                       ("length", str(nbytes)), (FOLDER_KEY, str(folder.resolve()))):
        tensor.external_data.add(key=key, value=value)


def _entries(tensor: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def read_at(folder: Path, location: str, offset: int, nbytes: int, what: str, *,
            read: bool = True) -> bytes:
    """``nbytes`` from ``offset`` of a checked location, opened without following links;
    the file must still be a regular, singly linked file holding them (``read=False``:
    only those checks, nothing read)."""
    fd = _open_inside(folder, location, what)
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise OnnxlrError(f"{what}: external data {location!r} is not a regular file")
        if st.st_nlink > 1:
            raise OnnxlrError(f"{what}: external data file {location!r} is a hard link; refused")
        if offset + nbytes > st.st_size:
            raise OnnxlrError(f"{what}: external data file {location!r} holds {st.st_size} "
                              f"bytes, the tensor needs {nbytes} from offset {offset} "
                              f"(truncated data file?)")
        if not read:
            return b""
        fh.seek(offset)
        data = fh.read(nbytes)
    if len(data) != nbytes:
        raise OnnxlrError(f"{what}: external data file {location!r} ended early")
    return data


def read_bytes(tensor: TensorProto) -> bytes:
    """A referenced tensor's bytes, read from its file now."""
    e = _entries(tensor)
    return read_at(Path(e[FOLDER_KEY]), e["location"], int(e["offset"]), int(e["length"]),
                   f"tensor {tensor.name!r}")


def read_array(tensor: TensorProto) -> np.ndarray:
    """A referenced tensor's values (a fresh array each call: nothing is cached)."""
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    return np.frombuffer(read_bytes(tensor), dtype=dtype).reshape(tuple(tensor.dims))


def folders(model: onnx.ModelProto) -> set[str]:
    """The folders a model's referenced tensors are read from (empty: none)."""
    return {_entries(t)[FOLDER_KEY] for t in all_tensors(model) if is_referenced(t)}


def unmark(tensor: TensorProto) -> None:
    """Drop the marker, keeping location, offset and length (what ORT reads)."""
    kept = [(e.key, e.value) for e in tensor.external_data if e.key != FOLDER_KEY]
    del tensor.external_data[:]
    for key, value in kept:
        tensor.external_data.add(key=key, value=value)


def for_session(model: onnx.ModelProto, opts) -> onnx.ModelProto:
    """The model as ONNX Runtime may take it as bytes: a copy (only the structure and the
    inline tensors are copied) without the markers, and ``opts`` told the one folder its
    referenced tensors are read from."""
    where = folders(model)
    if len(where) != 1:
        raise OnnxlrError(f"a model whose weights stay in files of {len(where)} folders: "
                          f"onnxruntime reads one folder")
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for t in all_tensors(copy):
        if is_referenced(t):
            unmark(t)
    opts.add_session_config_entry(ORT_FOLDER_OPTION, where.pop())
    return copy
