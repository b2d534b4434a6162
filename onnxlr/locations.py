"""Where a model's files may be: external-data locations checked, then opened safely.

External data of an untrusted model may name any path; ONNX's own loader followed ``..``,
absolute paths and symlinks in the past (CVE-2022-25882, CVE-2024-27318, CVE-2025-51480).
A location must be a plain relative name resolving inside the model's folder, not a
symlink, not a hard link (:func:`check_external_location`, before reading and before
writing), and the file is then opened component by component without following a link
(:func:`_open_inside`), so a link swapped in after the check is refused too.
"""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from onnxlr import validate
from onnxlr.errors import OnnxlrError

__all__ = ["check_external_location", "same_file"]


def check_external_location(location: str, base_dir: Path, *, what: str) -> Path:
    """Return the resolved path of an external-data location, or refuse it.

    Args:
        location: the ``location`` entry of a tensor's external data.
        base_dir: the folder of the model file; data must stay inside it.
        what: names the model file or tensor in the error message.
    """
    if not location:
        raise OnnxlrError(f"{what}: external data with an empty location")
    shown = validate.quote(location)
    if "\0" in location:
        raise OnnxlrError(f"{what}: external data location {shown} contains a NUL byte; refused")
    if len(location.encode("utf-8", "surrogatepass")) > _PATH_MAX or any(
            len(part.encode("utf-8", "surrogatepass")) > _NAME_MAX
            for part in location.replace("\\", "/").split("/")):
        raise OnnxlrError(f"{what}: external data location {shown} is longer than a file "
                          f"name may be; refused")
    try:
        return _check_location(location, base_dir, what=what, shown=shown)
    except (OSError, ValueError) as exc:  # whatever the OS makes of an odd name: one line
        raise OnnxlrError(f"{what}: external data location {shown} cannot be used "
                          f"({getattr(exc, 'strerror', None) or exc})") from None


#: Longest path and file name onnxlr accepts as an external-data location (POSIX's usual).
_PATH_MAX, _NAME_MAX = 4096, 255


def _check_location(location: str, base_dir: Path, *, what: str, shown: str) -> Path:
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
    if resolved.exists() and not resolved.is_file():
        kind = "a folder" if resolved.is_dir() else "not a regular file"
        raise OnnxlrError(f"{what}: external data location {shown} is {kind}; refused")
    if resolved.exists() and os.stat(resolved).st_nlink > 1:
        raise OnnxlrError(f"{what}: external data file {location!r} is a hard link; refused")
    return resolved


def _open_inside(base: Path, location: str, what: str) -> int:
    """Open ``base/location`` for reading without following any symlink on the way.

    ``check_external_location`` looked at the path; this opens it component by
    component with ``O_NOFOLLOW`` relative to the folder already opened, so a
    link swapped in between the check and the open is refused too. The file itself
    is ``stat``-ed first and opened with ``O_NONBLOCK``: a FIFO or device is refused,
    never waited on.
    """
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    nonblock = getattr(os, "O_NONBLOCK", 0)
    parts = Path(location).parts
    if os.open not in os.supports_dir_fd or not nofollow:  # e.g. Windows: the path check is all
        _require_regular(os.stat(base / location), location, what)
        return os.open(base / location, os.O_RDONLY | nonblock | getattr(os, "O_BINARY", 0))
    fd = os.open(base, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            flags = os.O_RDONLY | nofollow | (nonblock if last else getattr(os, "O_DIRECTORY", 0))
            try:
                if last:
                    _require_regular(os.stat(part, dir_fd=fd, follow_symlinks=False), location,
                                     what)
                nxt = os.open(part, flags, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise OnnxlrError(f"{what}: external data location {location!r} goes "
                                      f"through a symlink; refused") from None
                raise OnnxlrError(f"{what}: cannot open external data {location!r} "
                                  f"({exc.strerror})") from None
            os.close(fd)
            fd = nxt
        return fd
    except BaseException:
        os.close(fd)
        raise


def _require_regular(st: os.stat_result, location: str, what: str) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise OnnxlrError(f"{what}: external data location {location!r} goes through a "
                          f"symlink; refused")
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise OnnxlrError(f"{what}: external data {location!r} is {kind}; refused")


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when two paths name the same file (also through links)."""
    a, b = Path(a), Path(b)
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False
