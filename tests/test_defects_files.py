"""Issues 13.2, 13.4 (.npy part) and 13.5: every file read is a regular file checked before
it is opened, every size read from a file is checked before it is allocated, and odd
external-data locations get one line, never a traceback or a hang."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import zipfile

import numpy as np
import onnx
import pytest
from hostile import save_external, small_conv

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")


def _cli(*args, timeout=120):
    """Run onnxlr; a hang fails the test (TimeoutExpired) instead of blocking the suite."""
    return subprocess.run([sys.executable, "-m", "onnxlr", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def _one_line_error(proc, *words):
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert proc.stderr.startswith("onnxlr: error:") and len(proc.stderr.splitlines()) == 1, \
        proc.stderr
    for w in words:
        assert w in proc.stderr, proc.stderr


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(small_conv(), path)
    return path


# --- 13.2 FIFOs -------------------------------------------------------------------------------

@needs_fifo
@pytest.mark.parametrize("command", ["inspect", "optimize"])
def test_fifo_as_external_data_is_refused_not_waited_on(tmp_path, command):
    path = save_external(tmp_path, "pipe.data", data_path=None)
    os.mkfifo(tmp_path / "pipe.data")
    extra = ["-o", tmp_path / "o.onnx", "--no-verify", "--max-error", "none"] \
        if command == "optimize" else []
    _one_line_error(_cli(command, path, *extra, timeout=60), "pipe.data", "not a regular file")


@needs_fifo
@pytest.mark.parametrize("option", ["--inputs", "--calib"])
def test_fifo_as_inputs_or_calibration_is_refused(tmp_path, model, option):
    os.mkfifo(tmp_path / "data.npz")
    proc = _cli("optimize", model, "-o", tmp_path / "o.onnx", option, tmp_path / "data.npz",
                timeout=60)
    _one_line_error(proc, "data.npz", "not a regular file")


@needs_fifo
def test_fifo_in_a_calibration_folder_is_refused(tmp_path, model):
    folder = tmp_path / "calib"
    folder.mkdir()
    np.save(folder / "a.npy", np.zeros((4, 8, 9, 9), np.float32))
    os.mkfifo(folder / "b.npy")
    proc = _cli("optimize", model, "-o", tmp_path / "o.onnx", "--calib", folder, timeout=60)
    _one_line_error(proc, "b.npy", "not a regular file")


@needs_fifo
def test_fifo_as_bench_inputs_is_refused(tmp_path, model):
    os.mkfifo(tmp_path / "in.npz")
    _one_line_error(_cli("bench", model, "--inputs", tmp_path / "in.npz", timeout=60),
                    "not a regular file")


# --- 13.4 .npy headers that lie ----------------------------------------------------------------

def lying_npy(shape=(10**9, 8, 9, 9)) -> bytes:
    """A .npy whose header declares ``shape`` (terabytes) over 64 bytes of data."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False,
                                               "shape": shape})
    return buf.getvalue() + b"\0" * 64


@pytest.mark.parametrize("where", ["npz", "folder", "folder-npz"])
def test_lying_npy_header_in_calibration_is_refused_before_allocation(tmp_path, model, where):
    if where == "npz":
        source = tmp_path / "c.npz"
        with zipfile.ZipFile(source, "w") as z:
            z.writestr("x.npy", lying_npy())
    else:
        source = tmp_path / "calib"
        source.mkdir()
        if where == "folder":
            (source / "x.npy").write_bytes(lying_npy())
        else:
            with zipfile.ZipFile(source / "part.npz", "w", zipfile.ZIP_DEFLATED) as z:
                z.writestr("x.npy", lying_npy())
    proc = _cli("optimize", model, "-o", tmp_path / "o.onnx", "--calib", source)
    _one_line_error(proc, "header declares shape", "x.npy")


@pytest.mark.parametrize("command", ["optimize", "bench"])
def test_lying_npy_header_in_inputs_is_refused_before_allocation(tmp_path, model, command):
    source = tmp_path / "in.npz"
    with zipfile.ZipFile(source, "w") as z:
        z.writestr("x.npy", lying_npy((1, 8, 9, 9 * 10**10)))
    extra = ["-o", tmp_path / "o.onnx"] if command == "optimize" else []
    _one_line_error(_cli(command, model, *extra, "--inputs", source), "header declares shape")


def test_zip_bomb_member_is_refused_by_the_memory_cap(tmp_path, monkeypatch):
    """A member whose declared and real size agree, but which no machine could hold."""
    from onnxlr import arrays
    from onnxlr.errors import OnnxlrError
    source = tmp_path / "in.npz"
    np.savez(source, x=np.zeros((64, 64), np.float32))
    monkeypatch.setattr(arrays, "physical_memory", lambda: 1000)
    with pytest.raises(OnnxlrError, match="more than half this machine's memory"):
        arrays.load_npz(source, "inputs file")


def test_real_arrays_still_load(tmp_path):
    from onnxlr import arrays
    source = tmp_path / "in.npz"
    x, label = np.ones((3, 4), np.float16), np.arange(3)
    np.savez_compressed(source, x=x, label=label)
    got = arrays.load_npz(source)
    assert got.keys() == {"x", "label"} and (got["x"] == x).all() and got["x"].dtype == x.dtype
    np.save(tmp_path / "a.npy", x)
    assert (arrays.load_npy(tmp_path / "a.npy") == x).all()


# --- 13.5 odd external-data locations ----------------------------------------------------------

@pytest.mark.parametrize("location, words", [
    ("folder", ("a folder",)),
    ("a\0b", ("NUL byte",)),
    ("x" * 5000, ("longer than a file name",)),
    ("d/" + "y" * 300, ("longer than a file name",)),
])
@pytest.mark.parametrize("command", ["inspect", "optimize"])
def test_odd_external_data_locations_get_one_line(tmp_path, location, words, command):
    path = save_external(tmp_path, location, data_path=None)
    if location == "folder":
        (tmp_path / "folder").mkdir()
    extra = ["-o", tmp_path / "o.onnx", "--no-verify", "--max-error", "none"] \
        if command == "optimize" else []
    proc = _cli(command, path, *extra)
    _one_line_error(proc, *words)
    assert "Traceback" not in proc.stderr and len(proc.stderr) < 600
