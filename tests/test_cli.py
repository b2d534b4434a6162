"""The CLI as a user runs it: the main job on a model, and every bad-input case.

Bad input must give one line on stderr naming the problem, a non-zero exit
code, no traceback, the input untouched and no output file left behind.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import make_model, tiny_cnn, vinfo
from onnx import helper


def onnxlr(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "onnxlr", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=600)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_cnn(), path)
    return path


def test_optimize_writes_model_and_reports(model_path, tmp_path):
    out, rep_json, rep_md = tmp_path / "o.onnx", tmp_path / "r.json", tmp_path / "r.md"
    before = digest(model_path)
    done = onnxlr("optimize", model_path, "-o", out, "--rank", "0.4", "--max-error", "1.0", "--report", rep_json,
                  "--report", rep_md)
    assert done.returncode == 0, done.stderr
    assert "conv2" in done.stdout and "MACs" in done.stdout and "rel. L2 error" in done.stdout
    onnx.checker.check_model(onnx.load(out))
    data = json.loads(rep_json.read_text())
    assert data["schema"] == "onnxlr.report/1"
    assert data["summary"]["macs_ratio"] < 1 and data["summary"]["bound_met"] is True
    assert {l["name"] for l in data["layers"]} >= {"conv1", "conv2", "conv3", "fc1", "fc2"}
    assert rep_md.read_text().startswith("### onnxlr report")
    assert digest(model_path) == before
    assert not list(tmp_path.glob(".onnxlr-tmp-*"))


def test_inspect_lists_candidates(model_path):
    done = onnxlr("inspect", model_path)
    assert done.returncode == 0, done.stderr
    for name in ("conv1", "conv2", "conv3", "fc1", "fc2"):
        assert name in done.stdout


def test_on_exceed_fail_writes_rejected_path(model_path, tmp_path):
    out = tmp_path / "o.onnx"
    done = onnxlr("optimize", model_path, "-o", out, "--rank", "0.25", "--max-error", "1e-7",
                  "--on-exceed", "fail")
    assert done.returncode == 3
    assert not out.exists() and (tmp_path / "o.rejected.onnx").exists()
    assert "exceeds --max-error" in done.stderr


def _dynamic_seq_model(tmp_path):
    w = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="proj")],
                       [vinfo("x", ["batch", "seq", 8])], [vinfo("y", None)],
                       [onnx.numpy_helper.from_array(w, "W")])
    path = tmp_path / "dyn.onnx"
    onnx.save(model, path)
    return path


def _write(tmp_path, name, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


BAD_CASES = {
    "missing file": (lambda t, m: ["optimize", t / "nope.onnx", "-o", t / "o.onnx"], "no such file"),
    "not onnx": (lambda t, m: ["optimize", _write(t, "x.onnx", b"\x89PNG\r\n\x1a\nnot a model"),
                               "-o", t / "o.onnx"], "not an ONNX model"),
    "truncated": (lambda t, m: ["optimize", _write(t, "cut.onnx", m.read_bytes()[: m.stat().st_size // 2]),
                                "-o", t / "o.onnx"], "not an ONNX model"),
    "empty": (lambda t, m: ["optimize", _write(t, "e.onnx", b""), "-o", t / "o.onnx"], "empty file"),
    "unknown method": (lambda t, m: ["optimize", m, "-o", t / "o.onnx", "--method", "magic"],
                       "unknown method 'magic'"),
    "bad rank": (lambda t, m: ["optimize", m, "-o", t / "o.onnx", "--rank", "energy:2"], "energy:2"),
    "output is input": (lambda t, m: ["optimize", m, "-o", m], "output path is the input"),
    "bad input shape": (lambda t, m: ["optimize", m, "-o", t / "o.onnx", "--input-shape", "input:1xax8"],
                        "input:1xax8"),
    "missing output folder": (lambda t, m: ["optimize", m, "-o", t / "no" / "o.onnx"], "does not exist"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_one_line_error(case, model_path, tmp_path):
    make_args, expected = BAD_CASES[case]
    args = make_args(tmp_path, model_path)
    before = {p: digest(p) for p in tmp_path.iterdir() if p.is_file()}
    done = onnxlr(*args)
    assert done.returncode not in (0, 3), done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("onnxlr: error:") and expected in lines[0], lines[0]
    assert "Traceback" not in done.stderr
    for p, d in before.items():
        assert digest(p) == d, f"{p} changed"
    assert not (tmp_path / "o.onnx").exists()
    assert not list(tmp_path.glob(".onnxlr-tmp-*"))


def test_dynamic_dim_given_by_input_shape(tmp_path):
    path = _dynamic_seq_model(tmp_path)
    done = onnxlr("optimize", path, "-o", tmp_path / "o.onnx", "--input-shape", "x:2x5x8",
                  "--rank", "2", "--max-error", "none")
    assert done.returncode == 0, done.stderr
    assert "x[2, 5, 8]" in done.stdout


def test_dynamic_dim_defaults_to_128_and_the_report_says_so(tmp_path):
    done = onnxlr("optimize", _dynamic_seq_model(tmp_path), "-o", tmp_path / "o.onnx",
                  "--rank", "2", "--max-error", "none")
    assert done.returncode == 0, done.stderr
    assert "x[1, 128, 8]" in done.stdout
    assert "dynamic dim 'seq' set to 128 (the default; --input-shape to change)" in done.stdout


def test_inspect_with_a_channel_method_is_a_clean_error(tmp_path, capsys):
    import onnx

    from conftest import tiny_cnn
    from onnxlr.cli import main
    src = tmp_path / "m.onnx"
    onnx.save(tiny_cnn(), src)
    assert main(["inspect", str(src), "--method", "prune"]) == 1
    assert "inspect lists factorisation ranks" in capsys.readouterr().err
