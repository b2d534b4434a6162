"""Issues 13.1 and 13.8: no file onnxlr reads is a file it writes, and every output path is
checked before any work starts (one line, exit 1, nothing written, input untouched)."""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from hostile import digest_tree, save_external, small_conv

from onnxlr.cli import main


@pytest.fixture
def folder(tmp_path):
    onnx.save(small_conv(), tmp_path / "m.onnx")
    np.savez(tmp_path / "in.npz", x=np.zeros((1, 8, 9, 9), np.float32))
    (tmp_path / "calib").mkdir()
    np.save(tmp_path / "calib" / "a.npy", np.zeros((12, 8, 9, 9), np.float32))
    save_external(tmp_path / "ext")
    return tmp_path


def _refused(capsys, folder, argv, *words, monkeypatch=None):
    """onnxlr refuses ``argv`` with one line, before any work, changing no file."""
    import onnxlr.pipeline
    before = digest_tree(folder)
    if monkeypatch is not None:  # refused before the optimisation even starts
        monkeypatch.setattr(onnxlr.pipeline, "optimize",
                            lambda *a, **k: pytest.fail("optimize() ran before the check"))
    assert main([str(a) for a in argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("onnxlr: error:") and len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err
    assert digest_tree(folder) == before


@pytest.mark.parametrize("target, extra, words", [
    ("ext/w.data", [], ("external data",)),
    ("in.npz", ["--inputs", "in.npz"], ("--inputs",)),
    ("calib/a.npy", ["--calib", "calib"], ("--calib",)),
])
def test_output_onto_a_file_onnxlr_reads_is_refused(capsys, monkeypatch, folder, target, extra,
                                                     words):
    monkeypatch.chdir(folder)
    model = "ext/m.onnx" if target.startswith("ext/") else "m.onnx"
    _refused(capsys, folder, ["optimize", model, "-o", target, "--no-verify", "--max-error",
                              "none", *extra], "which onnxlr reads", *words,
             monkeypatch=monkeypatch)


@pytest.mark.parametrize("report, extra", [
    ("ext/w.data.json", []),      # not read: allowed below; the clash is the next one
    ("in.npz.md", ["--inputs", "in.npz"]),
])
def test_report_next_to_inputs_is_fine(capsys, monkeypatch, folder, report, extra):
    monkeypatch.chdir(folder)
    assert main(["optimize", "ext/m.onnx", "-o", "o.onnx", "--report", report, *extra]) == 0
    assert (folder / report).exists()


def test_report_onto_the_inputs_external_data_or_the_output_is_refused(capsys, monkeypatch,
                                                                       folder):
    monkeypatch.chdir(folder)
    os.rename(folder / "ext" / "w.data", folder / "ext" / "w.json")
    m = onnx.load(folder / "ext" / "m.onnx", load_external_data=False)
    for e in m.graph.initializer[0].external_data:
        if e.key == "location":
            e.value = "w.json"
    onnx.save(m, folder / "ext" / "m.onnx")
    _refused(capsys, folder, ["optimize", "ext/m.onnx", "-o", "o.onnx", "--report",
                              "ext/w.json"], "external data", monkeypatch=monkeypatch)
    _refused(capsys, folder, ["optimize", "m.onnx", "-o", "r.json", "--report", "r.json"],
             "two outputs", monkeypatch=monkeypatch)


@pytest.mark.parametrize("argv, words", [
    (["-o", "o.onnx", "--report", "nodir/r.md"], ("does not exist",)),
    (["-o", "o.onnx", "--report", "calib.md/"], ("is a folder",)),
    (["-o", "o.onnx", "--report", "rep.md"], ("is a folder",)),      # an existing folder
    (["-o", "newdir/"], ("is a folder",)),
    (["-o", "calib"], ("is a folder",)),
    (["-o", "nodir/o.onnx"], ("does not exist",)),
])
def test_bad_output_paths_are_refused_before_any_work(capsys, monkeypatch, folder, argv, words):
    monkeypatch.chdir(folder)
    (folder / "rep.md").mkdir()
    _refused(capsys, folder, ["optimize", "m.onnx", *argv], *words, monkeypatch=monkeypatch)
    assert not (folder / "newdir").exists() and not (folder / "o.onnx").exists()


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True,
                    reason="root writes into read-only folders")
def test_report_in_a_read_only_folder_is_refused_before_any_work(capsys, monkeypatch, folder):
    monkeypatch.chdir(folder)
    (folder / "ro").mkdir()
    os.chmod(folder / "ro", 0o555)
    try:
        _refused(capsys, folder, ["optimize", "m.onnx", "-o", "o.onnx", "--report", "ro/r.md"],
                 "not writable", monkeypatch=monkeypatch)
    finally:
        os.chmod(folder / "ro", 0o755)


def test_bench_outputs_are_checked_before_timing(capsys, monkeypatch, folder):
    import onnxlr.benchmark
    monkeypatch.chdir(folder)
    monkeypatch.setattr(onnxlr.benchmark, "benchmark",
                        lambda *a, **k: pytest.fail("benchmark() ran before the check"))
    _refused(capsys, folder, ["bench", "m.onnx", "--json", "m.onnx"], "which onnxlr reads")
    _refused(capsys, folder, ["bench", "ext/m.onnx", "--markdown", "ext/w.data"],
             "external data")
    _refused(capsys, folder, ["bench", "m.onnx", "--json", "nodir/b.json"], "does not exist")
