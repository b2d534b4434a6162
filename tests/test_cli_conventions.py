"""The conventions of the ONNX tool ecosystem (onnxsim, onnxslim, Polygraphy): output as a
second positional, comma shapes, -v/-q on every subcommand, a missed target's own exit code,
progress lines when stderr is not a terminal."""
import subprocess
import sys
from pathlib import Path

import pytest

from onnxlr.errors import OnnxlrError
from onnxlr.runtime import parse_input_shapes

EXAMPLE = str(Path(__file__).resolve().parents[1] / "examples" / "digits_cnn.onnx")


def _run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "onnxlr", *args], capture_output=True,
                          text=True, cwd=cwd)


def test_comma_and_x_shapes_parse_alike():
    assert parse_input_shapes(["x:1,3,224,224"]) == parse_input_shapes(["x:1x3x224x224"]) == {
        "x": (1, 3, 224, 224)}
    with pytest.raises(OnnxlrError, match="1,3,224,224"):
        parse_input_shapes(["x:1,,3"])


def test_output_as_second_positional_and_quiet(tmp_path):
    proc = _run("optimize", EXAMPLE, "out.onnx", "--rank", "0.5", "--max-error", "none",
                "--no-verify", "-q", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out.onnx").exists()
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2 and "x MACs" in lines[0] and lines[1].startswith("wrote")
    assert proc.stderr == ""


@pytest.mark.parametrize("args, message", [
    ([], "no output path"),
    (["a.onnx", "-o", "b.onnx"], "two outputs given"),
])
def test_output_mistakes_are_one_line(tmp_path, args, message):
    proc = _run("optimize", EXAMPLE, *args, "--no-verify", "--max-error", "none", cwd=tmp_path)
    assert proc.returncode == 1 and message in proc.stderr
    assert not list(tmp_path.iterdir())


def test_verbosity_after_the_subcommand_and_contradiction(tmp_path):
    proc = _run("inspect", EXAMPLE, "-v", cwd=tmp_path)
    assert proc.returncode == 0
    proc = _run("inspect", EXAMPLE, "-v", "-q", cwd=tmp_path)
    assert proc.returncode == 2 and "contradict" in proc.stderr


def test_a_missed_target_exits_4_and_keeps_the_result(tmp_path):
    proc = _run("optimize", EXAMPLE, "out.onnx", "--rank", "0.5", "--target-flops", "0.0001",
                "--latency-cache", "none", "--no-latency", cwd=tmp_path)
    assert proc.returncode == 4, proc.stderr
    assert "--target-flops 0.0001 was not reached" in proc.stderr
    assert (tmp_path / "out.onnx").exists()
    assert "\r" not in proc.stderr  # a pipe, not a terminal: no carriage-return bars


def test_plain_progress_lines_when_stderr_is_not_a_terminal():
    """After a few quiet seconds, one line per phase and per quarter of it."""
    import io

    from onnxlr import console
    clock = iter([0.0] + [10.0] * 100)
    out = io.StringIO()
    view = console.view(False, out)
    assert isinstance(view, console.Plain)
    view.clock = lambda: next(clock)
    view(0, 8, "timing conv1")       # within the first seconds: nothing
    for i in range(8):
        view(i, 8, f"timing conv{i}")
    view(0, 2, "sensitivity conv1")
    for i in range(3):                # a rank rule's build: bare layer names, one phase
        view(i, 3, f"/block{i}/Conv")
    assert out.getvalue().strip().splitlines() == [
        "onnxlr: timing conv0 (1/8)", "onnxlr: timing conv2 (3/8)",
        "onnxlr: timing conv4 (5/8)", "onnxlr: timing conv6 (7/8)",
        "onnxlr: sensitivity conv1 (1/2)", "onnxlr: /block0/Conv (1/3)",
        "onnxlr: /block1/Conv (2/3)", "onnxlr: /block2/Conv (3/3)"]
    assert console.view(True, out) is None   # -q: no progress at all


def test_progress_phases():
    from onnxlr.console import phase_of
    assert phase_of("timing /a/Conv") == ("timing", "/a/Conv")
    assert phase_of("budget: measuring fc1") == ("budget: measuring", "fc1")
    assert phase_of("calibration samples") == ("calibration samples", "")
    assert phase_of("/features/features.0/Conv") == ("factorising", "/features/features.0/Conv")
    assert phase_of("Conv 1") == ("factorising", "Conv 1")     # a layer name with a space


def test_reports_get_the_usual_file_mode(tmp_path):
    import os
    import stat
    proc = _run("optimize", EXAMPLE, "out.onnx", "--rank", "0.5", "--max-error", "none",
                "--no-verify", "-q", "--report", "r.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o666 & ~umask
