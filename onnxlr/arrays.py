"""Reading ``.npy``/``.npz`` arrays from user files without trusting their headers.

``np.load`` allocates what a ``.npy`` header declares before reading a byte of data: a
50-byte file that claims a 10¹²-element shape asks for terabytes, and so does an ``.npz``
member. It also opens whatever the path names: a FIFO blocks it forever. Here a file is
opened only if it is a regular file (checked with ``os.stat`` before the open, and again
on the open descriptor), and every array's header is read first with numpy's own header
reader: its size must fit in the bytes the file (or zip member) holds and in this
machine's memory, all arrays of the file together, before any of them is read.
"""
from __future__ import annotations

import math
import os
import stat
import zipfile
from typing import IO

import numpy as np

from onnxlr.errors import OnnxlrError
from onnxlr.validate import physical_memory

__all__ = ["check_regular", "load_npy", "load_npz", "open_regular"]


def check_regular(path: str | os.PathLike, what: str) -> os.stat_result:
    """``os.stat`` of a file onnxlr is about to read, refusing anything but a regular file
    (a FIFO or device would block or never end; a folder cannot be read)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise OnnxlrError(f"cannot read {what} {path}: it does not exist") from None
    except (OSError, ValueError) as exc:
        raise OnnxlrError(f"cannot read {what} {path}: {getattr(exc, 'strerror', None) or exc}") \
            from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise OnnxlrError(f"{what} {path}: {kind}; expected a .npz/.npy file")
    return st


def open_regular(path: str | os.PathLike, what: str) -> IO[bytes]:
    """Open a regular file for reading; never blocks (O_NONBLOCK, then fstat again, so a
    file swapped for a FIFO after the check is refused too)."""
    check_regular(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise OnnxlrError(f"cannot read {what} {path}: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OnnxlrError(f"{what} {path}: not a regular file")
    return os.fdopen(fd, "rb")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _header(fh: IO[bytes], where: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from a ``.npy`` header, read with numpy's reader, nothing allocated."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fh)
        read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, _, dtype = read(fh)
    except (ValueError, EOFError, OSError) as exc:
        raise OnnxlrError(f"cannot read {where}: not a .npy array ({_first_line(exc)})") from None
    if dtype.hasobject:
        raise OnnxlrError(f"{where}: holds Python objects (pickles are never loaded)")
    return tuple(int(d) for d in shape), dtype


def _check_size(shape, dtype: np.dtype, room: int, where: str) -> int:
    need = math.prod(shape) * dtype.itemsize
    if need > room:
        raise OnnxlrError(f"{where}: header declares shape {list(shape)} of {dtype} "
                          f"({need} bytes) but holds {room} bytes of data; refused")
    return need


def _check_total(total: int, path, what: str) -> None:
    memory = physical_memory()
    if memory is not None and total > memory // 2:
        raise OnnxlrError(f"{what} {path}: its arrays declare {total} bytes, more than half "
                          f"this machine's memory ({memory} bytes); refused")


def _read(fh: IO[bytes], where: str) -> np.ndarray:
    try:
        return np.lib.format.read_array(fh, allow_pickle=False)
    except (ValueError, EOFError, OSError, zipfile.BadZipFile) as exc:
        raise OnnxlrError(f"cannot read {where}: {_first_line(exc)}") from None


def load_npy(path: str | os.PathLike, what: str = "file") -> np.ndarray:
    """One ``.npy`` array, its header checked against the file's size first."""
    with open_regular(path, what) as fh:
        where = f"{what} {path}"
        shape, dtype = _header(fh, where)
        size = os.fstat(fh.fileno()).st_size
        _check_total(_check_size(shape, dtype, size - fh.tell(), where), path, what)
        fh.seek(0)
        return _read(fh, where)


def load_npz(path: str | os.PathLike, what: str = "file") -> dict[str, np.ndarray]:
    """Every array of a ``.npz`` (key: member name without ``.npy``), headers checked first:
    each against its member's size, all together against this machine's memory."""
    with open_regular(path, what) as fh:
        try:
            archive = zipfile.ZipFile(fh)
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise OnnxlrError(f"cannot read {what} {path}: not a .npz archive "
                               f"({_first_line(exc)})") from None
        with archive:
            members = [m for m in archive.infolist() if not m.is_dir()]
            total = 0
            for m in members:
                where = f"{what} {path}, array {m.filename!r}"
                with archive.open(m) as member:
                    shape, dtype = _header(member, where)
                    total += _check_size(shape, dtype, m.file_size - member.tell(), where)
            _check_total(total, path, what)
            out = {}
            for m in members:
                with archive.open(m) as member:
                    key = m.filename[:-4] if m.filename.endswith(".npy") else m.filename
                    out[key] = _read(member, f"{what} {path}, array {m.filename!r}")
            return out
