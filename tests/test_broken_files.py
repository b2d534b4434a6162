"""A corpus of deliberately broken model files, through the CLI as a user runs it.

Each file must give its own one-line message and exit code 1, leave every file
(the input, its data, anything outside) untouched, and leave no output and no
temporary file behind. ``test_cli.py`` covers the first few (missing, PNG bytes,
cut in half, empty); these are the rest. The CLI is called in-process: same
code path, a fraction of the start-up time.
"""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from hostile import (cyclic_model, dangling_model, digest_tree, lying_header,
                     missing_initializer_model, save_external, small_conv)
from onnx import numpy_helper

from onnxlr.cli import main
from onnxlr.errors import OnnxlrError
from onnxlr.io import load_model


def _file(data: bytes):
    def make(folder):
        path = folder / "m.onnx"
        path.write_bytes(data)
        return path
    return make


def _model(build):
    def make(folder):
        path = folder / "m.onnx"
        path.write_bytes(build().SerializeToString())
        return path
    return make


def _edited(edit):
    def build():
        model = small_conv()
        edit(model)
        return model
    return _model(build)


def _outside_data(link):
    """External data in ../outside/secret.data, reached by a link of kind ``link``."""
    def make(folder):
        secret = folder.parent / "outside" / "secret.data"
        secret.parent.mkdir(exist_ok=True)
        secret.write_bytes(small_conv().graph.initializer[0].raw_data)
        if link == "symlink":
            (folder / "w.data").symlink_to(secret)
        else:
            os.link(secret, folder / "w.data")
        return save_external(folder, "w.data", data_path=None)
    return make


def _giant(folder):
    path = folder / "m.onnx"
    with open(path, "wb") as fh:
        fh.truncate(2**31 + 16)  # sparse: no disk used, and never read
    return path


def _tensor_file(folder):
    tensor = numpy_helper.from_array(np.ones(4096, np.float32), "t")
    return _file(tensor.SerializeToString())(folder)


def _set_ir(model):
    model.ir_version = 99


def _bad_op(model):
    model.graph.node[0].op_type = "Convv"


def _head(folder):
    return _file(small_conv().SerializeToString()[:7])(folder)


def _cut_in_weights(folder):
    data = small_conv().SerializeToString()
    return _file(data[: len(data) - 2000])(folder)


CORPUS = {
    "cut in the header": (_head, "not an ONNX model"),
    "cut inside the weights": (_cut_in_weights, "not an ONNX model"),
    "zip (PyTorch .pt) magic": (_file(b"PK\x03\x04\x14\x00\x00\x00" + b"\x00" * 64),
                                "not an ONNX model"),
    "gzip magic": (_file(b"\x1f\x8b\x08\x00" + b"\x00" * 64), "not an ONNX model"),
    "ONNX text format": (_file(b"<ir_version: 8, opset_import: [\"\" : 17]>\nagraph (float[N] x)"
                               b" => (float[N] y) { y = Relu(x) }"), "not an ONNX model"),
    "a TensorProto, not a model": (_tensor_file, "not an ONNX model"),
    "over 2 GiB": (_giant, "over protobuf's 2 GiB limit"),
    "a folder": (lambda folder: (folder / "d.onnx").mkdir() or folder / "d.onnx",
                 "not a regular file"),
    "cyclic graph": (_model(cyclic_model), "the graph has a cycle: 'r1' -> 'r2' -> 'r1'"),
    "dangling input": (_model(dangling_model), "reads 'ghost', which no node, graph input or "
                                               "initializer provides (dangling input)"),
    "missing initializer": (_model(missing_initializer_model),
                            "node 'conv' (Conv) reads weight 'W', but the model has no "
                            "initializer or input of that name (missing initializer)"),
    "lying tensor header": (_model(lambda: lying_header(1000)),
                            "tensor 'W' declares shape 1000x8x3x3 (288000 bytes) but holds 4608"),
    "ir_version from the future": (_edited(_set_ir), "ir_version 99 is higher"),
    "unknown standard op": (_edited(_bad_op), "No Op registered for Convv"),
    "external data path traversal": (lambda f: save_external(f, "../outside/w.data"),
                                     "contains '..'; refused"),
    "external data absolute path": (lambda f: save_external(f, str(f.parent / "abs.data"),
                                                            data_path=f.parent / "abs.data"),
                                    "is absolute; refused"),
    "symlinked external data": (_outside_data("symlink"), "is a symlink; refused"),
    "hard-linked external data": (_outside_data("hardlink"), "is a hard link; refused"),
    "missing external data file": (lambda f: save_external(f, "w.data", data_path=None),
                                   "cannot open external data 'w.data'"),
    "truncated external data": (lambda f: save_external(f, "w.data", offset=100),
                                "truncated data file?"),
}


@pytest.mark.parametrize("command", ["optimize", "inspect"])
@pytest.mark.parametrize("case", list(CORPUS))
def test_broken_file(case, command, tmp_path, capsys):
    make, expected = CORPUS[case]
    folder = tmp_path / "in"
    folder.mkdir()
    path = make(folder)
    before = digest_tree(tmp_path)
    out = tmp_path / "out.onnx"
    args = (["optimize", str(path), "-o", str(out)] if command == "optimize"
            else ["inspect", str(path)])
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxlr: error: "), err
    assert expected in lines[0], lines[0]
    assert str(path) in lines[0], lines[0]
    assert digest_tree(tmp_path) == before  # input, its data, outside files: all untouched
    assert not out.exists() and not list(tmp_path.rglob(".onnxlr-*"))


def test_every_truncation_is_a_clean_error_or_a_valid_model(tmp_path):
    """Cut a model file at every 37th byte: load_model raises OnnxlrError or returns a model
    the checker accepts (a cut at a field boundary can leave a smaller valid model)."""
    data = small_conv().SerializeToString()
    path = tmp_path / "m.onnx"
    outcomes = set()
    for cut in range(1, len(data), 37):
        path.write_bytes(data[:cut])
        try:
            model = load_model(path)
        except OnnxlrError as exc:
            assert "\n" not in str(exc)
            outcomes.add("error")
        else:
            onnx.checker.check_model(model)
            outcomes.add("valid")
    assert "error" in outcomes


def test_unsorted_but_acyclic_graph_is_accepted(tmp_path, capsys):
    from hostile import unsorted_model
    path = tmp_path / "m.onnx"
    onnx.save(unsorted_model(), path)
    rc = main(["optimize", str(path), "-o", str(tmp_path / "o.onnx"), "--method", "tucker",
               "--rank", "0.5", "--max-error", "none"])
    assert rc == 0, capsys.readouterr().err
    out = onnx.load(tmp_path / "o.onnx")
    onnx.checker.check_model(out)
    assert out.graph.node[-1].op_type == "Relu"
