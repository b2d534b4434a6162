"""Builders of hostile and broken model files, shared by the security and broken-file tests."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
from conftest import conv_model, vinfo
from onnx import TensorProto, helper


def weight(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((16, 8, 3, 3)).astype(np.float32)


def small_conv() -> onnx.ModelProto:
    """A 3×3 conv 8→16 on a 1×8×9×9 input: big enough to factorise, quick to run."""
    return conv_model(weight(), x_shape=(1, 8, 9, 9))


def with_external(model: onnx.ModelProto, location: str, *, offset: int = 0,
                  length: int | None = None) -> onnx.ModelProto:
    """The model with its first initializer pointing at ``location`` (no file is written)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    t = out.graph.initializer[0]
    size = len(t.raw_data)
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)),
                       ("length", str(size if length is None else length))):
        t.external_data.add(key=key, value=value)
    return out


def save_external(folder: Path, location: str = "w.data", *, data_path: Path | None | str = "",
                  name: str = "m.onnx", **kw) -> Path:
    """Write ``small_conv`` with its weight in external data; the bytes go to ``data_path``
    (default ``folder/location``; None writes no data file, for locations an attack set up)."""
    model = small_conv()
    raw = model.graph.initializer[0].raw_data
    target = folder / location if data_path == "" else data_path
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(raw)
    path = folder / name
    onnx.save(with_external(model, location, **kw), path)
    return path


def digest_tree(folder: Path) -> dict[str, str]:
    """Hash of every file below ``folder`` (symlinks by their target's name)."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = Path(root) / f
            if p.is_symlink():
                out[str(p)] = "link:" + os.readlink(p)
            elif p.stat().st_size > 2**26:  # a sparse giant: its size and time say enough
                out[str(p)] = f"{p.stat().st_size}:{p.stat().st_mtime_ns}"
            else:
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def cyclic_model() -> onnx.ModelProto:
    nodes = [helper.make_node("Relu", ["b"], ["a"], name="r1"),
             helper.make_node("Relu", ["a"], ["b"], name="r2"),
             helper.make_node("Add", ["x", "a"], ["y"], name="add")]
    return _raw_model(nodes, [vinfo("x", [2])], [vinfo("y", [2])])


def dangling_model() -> onnx.ModelProto:
    nodes = [helper.make_node("Relu", ["ghost"], ["y"], name="relu")]
    return _raw_model(nodes, [vinfo("x", [1, 8])], [vinfo("y", [1, 8])])


def missing_initializer_model() -> onnx.ModelProto:
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], name="conv")]
    return _raw_model(nodes, [vinfo("x", [1, 8, 9, 9])], [vinfo("y", [1, 16, 7, 7])])


def unsorted_model() -> onnx.ModelProto:
    """Acyclic but stored out of order (the checker refuses it; onnxlr sorts it)."""
    w = weight()
    nodes = [helper.make_node("Relu", ["c"], ["y"], name="relu"),
             helper.make_node("Conv", ["x", "W"], ["c"], name="conv")]
    return _raw_model(nodes, [vinfo("x", [1, 8, 9, 9])], [vinfo("y", [1, 16, 7, 7])],
                      [onnx.numpy_helper.from_array(w, "W")])


def _raw_model(nodes, inputs, outputs, inits=()) -> onnx.ModelProto:
    """A model built without the checker (make_model would refuse the broken ones)."""
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def lying_header(dim0: int) -> onnx.ModelProto:
    """``small_conv`` whose weight claims ``dim0`` output channels over 16 channels of data."""
    model = small_conv()
    model.graph.initializer[0].dims[0] = dim0
    return model


__all__ = ["cyclic_model", "dangling_model", "digest_tree", "lying_header",
           "missing_initializer_model", "save_external", "small_conv", "unsorted_model",
           "weight", "with_external"]
