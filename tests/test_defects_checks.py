"""Issues 13.3, 13.9, 13.10 and 13.12: checks that saw nothing fail loudly, calibration
leaves no temporary folder behind, bad option values are refused while parsing, declined
quantized layers are in every report."""
from __future__ import annotations

import gc
import subprocess
import sys
import tempfile

import numpy as np
import onnx
import pytest
from conftest import conv_model
from hostile import small_conv, weight

from onnxlr.cli import main
from onnxlr.errors import OnnxlrError
from onnxlr.pipeline import optimize


def dynamic_conv() -> onnx.ModelProto:
    return conv_model(weight(), x_shape=("N", 8, 9, 9))


# --- 13.3 ------------------------------------------------------------------------------------

def test_nan_inputs_fail_the_classic_verifier(tmp_path):
    np.savez(tmp_path / "nan.npz", x=np.full((1, 8, 9, 9), np.nan, np.float32))
    with pytest.raises(OnnxlrError, match=r"nan\.npz: output 'y' of the original has no finite"):
        optimize(small_conv(), "tucker", "0.5", inputs=str(tmp_path / "nan.npz"))


def test_empty_inputs_fail_the_classic_verifier(tmp_path):
    """Zero samples (what --batch 0 gave before it was refused): nothing was compared."""
    np.savez(tmp_path / "empty.npz", x=np.zeros((0, 8, 9, 9), np.float32))
    with pytest.raises(OnnxlrError, match="is empty on the verification inputs"):
        optimize(dynamic_conv(), "tucker", "0.5", inputs=str(tmp_path / "empty.npz"))


def test_cli_nan_inputs_one_line_exit_1(tmp_path, capsys):
    onnx.save(small_conv(), tmp_path / "m.onnx")
    np.savez(tmp_path / "nan.npz", x=np.full((1, 8, 9, 9), np.nan, np.float32))
    assert main(["optimize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx"),
                 "--inputs", str(tmp_path / "nan.npz")]) == 1
    out, err = capsys.readouterr()
    assert "bound met" not in out and len(err.splitlines()) == 1 and "no finite" in err
    assert not (tmp_path / "o.onnx").exists()


# --- 13.9 ------------------------------------------------------------------------------------

@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_calibration_names_file_and_input_and_leaves_nothing(private_tmp, bad):
    data = np.random.default_rng(0).standard_normal((20, 8, 9, 9)).astype(np.float32)
    data[13, 2, 1, 1] = bad
    np.savez(private_tmp / "c.npz", x=data)
    with pytest.raises(OnnxlrError, match=r"c\.npz: 'x' holds NaN or infinite values"):
        optimize(small_conv(), "tucker", "0.5", calib=str(private_tmp / "c.npz"))
    assert not list(private_tmp.glob("onnxlr-holdout-*"))


def test_holdout_folder_removed_whatever_fails_after_it(private_tmp, monkeypatch):
    import onnxlr.verify
    np.savez(private_tmp / "c.npz",
             x=np.random.default_rng(0).standard_normal((20, 8, 9, 9)).astype(np.float32))

    def broken(*a, **k):
        raise OnnxlrError("verifier failed")
    monkeypatch.setattr(onnxlr.verify, "Verifier", broken)
    with pytest.raises(OnnxlrError, match="verifier failed"):
        optimize(small_conv(), "tucker", "0.5", calib=str(private_tmp / "c.npz"))
    gc.collect()
    assert not list(private_tmp.glob("onnxlr-holdout-*"))


def test_holdout_folder_removed_at_exit_of_a_failed_cli_run(tmp_path):
    """Finite calibration data the model overflows on: the run fails after the held-out
    samples were written, and the folder is gone once onnxlr has exited."""
    np.savez(tmp_path / "c.npz", x=np.full((20, 8, 9, 9), 3e38, np.float32))
    onnx.save(small_conv(), tmp_path / "m.onnx")
    code = ("import tempfile, sys; tempfile.tempdir = sys.argv[1]; from onnxlr.cli import main; "
            "sys.exit(main(sys.argv[2:]))")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path), "optimize",
                           str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx"),
                           "--calib", str(tmp_path / "c.npz"), "--method", "tucker",
                           "--rank", "0.5"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert not list(tmp_path.glob("onnxlr-holdout-*")) and not (tmp_path / "o.onnx").exists()


# --- 13.10 -----------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["optimize", "m.onnx", "-o", "o.onnx", "--batch", "-1"],
    ["optimize", "m.onnx", "-o", "o.onnx", "--batch", "0"],
    ["optimize", "m.onnx", "-o", "o.onnx", "--cp-max-seconds", "-1"],
    ["optimize", "m.onnx", "-o", "o.onnx", "--cp-max-seconds", "nan"],
    ["optimize", "m.onnx", "-o", "o.onnx", "--cp-max-seconds", "inf"],
    ["optimize", "m.onnx", "-o", "o.onnx", "--max-error", "nan"],
    ["optimize", "m.onnx", "-o", "o.onnx", "--max-error", "-0.1"],
    ["optimize", "m.onnx", "-o", "o.onnx", "--rank-multiple", "0"],
    ["optimize", "m.onnx", "-o", "o.onnx", "--calib-samples", "0"],
    ["optimize", "m.onnx", "-o", "o.onnx", "--timing-batch", "0"],
    ["optimize", "m.onnx", "-o", "o.onnx", "--min-layer-speedup", "nan"],
    ["optimize", "m.onnx", "-o", "o.onnx", "--threads", "0"],
    ["optimize", "m.onnx", "-o", "o.onnx", "--target-flops", "-0.5"],
    ["optimize", "m.onnx", "-o", "o.onnx", "--target-speedup", "inf"],
    ["inspect", "m.onnx", "--rank-multiple", "-3"],
    ["bench", "m.onnx", "--batch", "-1"],
    ["bench", "m.onnx", "--threads", "-2"],
    ["bench", "m.onnx", "--warmup", "-1"],
    ["bench", "m.onnx", "--iterations", "0"],
    ["bench", "m.onnx", "--max-seconds", "nan"],
])
def test_bad_numeric_option_values_are_refused_while_parsing(capsys, argv):
    """(--max-drop is the search's: it refuses NaN and negatives itself, exit 1.)"""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert "error: argument" in err and ("must be" in err or "expected" in err), err


@pytest.mark.parametrize("kwargs", [{"batch": -1}, {"batch": 0}, {"cp_max_seconds": float("nan")},
                                    {"cp_max_seconds": -1}])
def test_bad_values_refused_by_the_api_too(kwargs):
    with pytest.raises(OnnxlrError, match="invalid --"):
        optimize(dynamic_conv(), "tucker", "0.5", **kwargs)


# --- 13.12 -----------------------------------------------------------------------------------

def test_declined_quantized_layers_are_in_text_and_markdown_reports():
    from test_unusual_models import quantized_model
    _, report = optimize(quantized_model(np.random.default_rng(0)), "auto", "0.5",
                         max_error=0.01)
    text, md, page = report.to_text(), report.to_markdown(), report.to_html()
    for name in ("qconv", "mmint", "deq"):
        assert name in text and name in md.replace("\\_", "_") and name in page
    assert "0 of 3 candidates" in text and "quantized layer (QLinearConv)" in text
    assert "DequantizeLinear" in text and "DequantizeLinear" in md
