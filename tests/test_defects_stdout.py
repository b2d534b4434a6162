"""Issue 13.13: onnx-graphsurgeon's messages go to logging (stderr); stdout carries only the report."""
from __future__ import annotations

import logging
import subprocess
import sys

import onnx
from conftest import init, make_model, vinfo
from hostile import weight
from onnx import helper


def test_graphsurgeon_messages_go_to_logging_not_stdout(capsys, caplog):
    from onnx_graphsurgeon.logger import G_LOGGER

    import onnxlr.graph  # noqa: F401  (installs the route)
    caplog.set_level(logging.DEBUG, logger="onnx_graphsurgeon")
    G_LOGGER.warning("a graphsurgeon warning")
    assert capsys.readouterr().out == ""
    assert "a graphsurgeon warning" in caplog.text


def test_cli_stdout_is_only_the_report(tmp_path):
    """A BFLOAT16 constant makes onnx-graphsurgeon warn; the warning must not reach stdout."""
    bf = helper.make_tensor("B", onnx.TensorProto.BFLOAT16, [2], [1.0, 2.0])
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], name="conv"),
             helper.make_node("Cast", ["B"], ["bf"], to=onnx.TensorProto.FLOAT, name="cast")]
    model = make_model(nodes, [vinfo("x", [1, 8, 9, 9])], [vinfo("y", None), vinfo("bf", [2])],
                       [init("W", weight()), bf])
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    proc = subprocess.run([sys.executable, "-m", "onnxlr", "inspect", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].startswith("layer"), proc.stdout
    assert "Could not convert" not in proc.stdout and "[W]" not in proc.stdout
