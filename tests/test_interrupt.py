"""Interrupting a run never leaves a partial output, a temporary file or a changed input.

End to end: ``python -m onnxlr optimize`` on a model whose save takes a moment, signalled
(SIGINT, SIGTERM) at several points, the last ones the instant its temporary folder appears,
i.e. mid-write. In process: an interrupt inside each step of ``save_model``.
"""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import init, make_model, vinfo
from onnx import helper

from onnxlr import io
from onnxlr.cli import main
from onnxlr.io import load_model, save_model

BIG = (1000, 4000)  # a 16 MB initializer nothing factorises: saving it takes a moment


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The input model, and the bytes a completed run writes (made in process: same code)."""
    folder = tmp_path_factory.mktemp("interrupt")
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Gemm", ["a", "W"], ["y"], name="fc"),
             helper.make_node("Add", ["u", "big"], ["z"], name="add")]
    model = make_model(nodes, [vinfo("a", [2, 64]), vinfo("u", list(BIG))],
                       [vinfo("y", [2, 64]), vinfo("z", list(BIG))],
                       [init("W", rng.standard_normal((64, 64)).astype(np.float32)),
                        init("big", np.ones(BIG, np.float32))])
    path = folder / "in.onnx"
    onnx.save(model, path)
    out = folder / "done" / "out.onnx"
    out.parent.mkdir()
    assert main(command(path, out)[3:]) == 0
    return path, sha(path), out.read_bytes()


def command(path: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "onnxlr", "optimize", str(path), "-o", str(out),
            "--method", "svd", "--rank", "8", "--no-verify", "--max-error", "none"]


def _signal_run(path: Path, out: Path, sig: int, delay: float | None) -> int:
    """Start a run; send ``sig`` after ``delay`` s, or (None) when its temp folder appears."""
    proc = subprocess.Popen(command(path, out), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        if delay is not None:
            time.sleep(delay)
        else:
            deadline = time.monotonic() + 120
            while not list(out.parent.glob(".onnxlr-tmp-*")) and proc.poll() is None:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.0005)
        if proc.poll() is None:
            proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in err, err
    return proc.returncode


@pytest.mark.parametrize("sig,delay", [
    (signal.SIGINT, 1.0),     # while importing, loading or factorising, on most machines
    (signal.SIGINT, 2.0),
    (signal.SIGINT, None),    # the moment the temporary folder appears: mid-write
    (signal.SIGTERM, None),
])
def test_signal_leaves_no_partial_output(job, tmp_path, sig, delay):
    path, digest, complete = job
    out = tmp_path / "out.onnx"
    rc = _signal_run(path, out, sig, delay)
    # 130: onnxlr's own exit code for an interrupt. -sig: the interpreter ended itself by the
    # signal, as CPython does after a KeyboardInterrupt went through code run by exec() of a
    # string (scipy's import does that), even though onnxlr caught it and printed its message.
    assert rc in (0, 130, -sig), rc
    assert sha(path) == digest  # the input is untouched
    assert not list(tmp_path.glob(".onnxlr-*")), list(tmp_path.iterdir())
    if out.exists():  # only ever a complete model: the same bytes an uninterrupted run writes
        assert out.read_bytes() == complete
    else:
        assert rc != 0
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["out.onnx"])


# --- in process: each step of save_model ------------------------------------------------------

def small():
    w = np.random.default_rng(1).standard_normal((64, 64)).astype(np.float32)
    return make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
                      [vinfo("x", [2, 64])], [vinfo("y", [2, 64])], [init("W", w)])


@pytest.mark.parametrize("external,step", [(False, "_write_proto"), (True, "_write_proto"),
                                           (True, "_write_external")])
def test_interrupt_inside_save_keeps_the_old_output(tmp_path, monkeypatch, external, step):
    out = tmp_path / "m.onnx"
    save_model(small(), out, external_data=external)
    before = {p.name: sha(p) for p in tmp_path.iterdir()}
    real = getattr(io, step)

    def interrupted(*args):
        real(*args)  # the temporary files are complete, the renames not yet done
        raise KeyboardInterrupt

    monkeypatch.setattr(io, step, interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_model(small(), out, external_data=external)
    assert {p.name: sha(p) for p in tmp_path.iterdir()} == before  # old output, no temp folder


def test_sigterm_while_writing_becomes_an_interrupt_and_cleans_up(tmp_path, monkeypatch):
    previous = signal.getsignal(signal.SIGTERM)

    def killed(model, path):
        path.write_bytes(b"half a model")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)  # the handler raises before this ends

    monkeypatch.setattr(io, "_write_proto", killed)
    with pytest.raises(KeyboardInterrupt):
        save_model(small(), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is previous


def test_signal_during_the_renames_waits_until_both_files_are_in_place(tmp_path, monkeypatch):
    """Model and external data move together: a SIGINT between the two renames is held back
    until both are done, then arrives as usual."""
    real = os.replace
    calls = []

    def replace(src, dst):
        calls.append(Path(dst).name)
        if len(calls) == 1:
            # the signal arriving now, synchronously: os.kill delivers it whenever the
            # interpreter next checks, which on a loaded machine was after the save returned
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
        real(src, dst)

    monkeypatch.setattr(io.os, "replace", replace)
    # Python's own Ctrl-C handler, whatever an earlier test in this process left installed
    restore = signal.signal(signal.SIGINT, signal.default_int_handler)
    idle = threading.Event()  # another thread, as ORT and BLAS start: it may take the signal
    helper = threading.Thread(target=idle.wait, daemon=True)
    helper.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            save_model(small(), tmp_path / "m.onnx", external_data=True)
    finally:
        idle.set()
        helper.join()
        signal.signal(signal.SIGINT, restore)
    assert calls == ["m.onnx.data", "m.onnx"]
    assert load_model(tmp_path / "m.onnx").graph.initializer[0].name == "W"
    assert not list(tmp_path.glob(".onnxlr-*"))
