"""Issue 13.4 (sparse part) and 13.7: sparse initializers are checked before they are made
dense, and made dense in their own dtype, so the result loads in ONNX Runtime."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import vinfo
from hostile import weight
from onnx import TensorProto, helper, numpy_helper

from onnxlr.errors import OnnxlrError
from onnxlr.io import load_model
from onnxlr.pipeline import optimize


def sparse_conv(layout: str = "flat", dtype=np.float32, dims=None) -> onnx.ModelProto:
    w = weight().astype(dtype)
    flat = w.ravel()
    nz = np.nonzero(np.abs(flat) > 0.5)[0]
    values = numpy_helper.from_array(flat[nz], "W")
    index = nz if layout == "flat" else np.stack(np.unravel_index(nz, w.shape), axis=1)
    indices = numpy_helper.from_array(index.astype(np.int64), "W_i")
    sparse = helper.make_sparse_tensor(values, indices, list(dims or w.shape))
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    node = helper.make_node("Conv", ["x", "W"], ["y"], name="conv", pads=[1, 1, 1, 1])
    graph = helper.make_graph([node], "g", [vinfo("x", (1, 8, 9, 9), elem)],
                              [vinfo("y", (1, 16, 9, 9), elem)], sparse_initializer=[sparse])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def huge_sparse() -> onnx.ModelProto:
    values = helper.make_tensor("W", TensorProto.FLOAT, [1], [1.0])
    indices = helper.make_tensor("W_i", TensorProto.INT64, [1], [0])
    sparse = helper.make_sparse_tensor(values, indices, [2**20, 2**20])
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    graph = helper.make_graph([node], "g", [vinfo("x", (1, 2**20))], [vinfo("y", (1, 2**20))],
                              sparse_initializer=[sparse])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "onnxlr", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("command", ["inspect", "optimize"])
def test_huge_sparse_initializer_refused_before_allocation(tmp_path, command):
    path = tmp_path / "m.onnx"
    onnx.save(huge_sparse(), path)
    extra = ["-o", tmp_path / "o.onnx", "--no-verify", "--max-error", "none"] \
        if command == "optimize" else []
    proc = _cli(command, path, *extra)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("onnxlr: error:") and len(proc.stderr.splitlines()) == 1
    assert "sparse" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_sparse_index_outside_its_shape_refused():
    model = sparse_conv()
    sparse = model.graph.sparse_initializer[0]
    index = numpy_helper.to_array(sparse.indices).copy()
    index[-1] = 10**9
    sparse.indices.CopyFrom(numpy_helper.from_array(index, "W_i"))
    with pytest.raises(OnnxlrError, match="sparse tensor 'W': an index lies outside"):
        optimize(model, "auto", "0.5", max_error=None, verify=False)


@pytest.mark.parametrize("layout", ["flat", "coordinates"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_sparse_weight_keeps_its_dtype_and_loads_in_ort(tmp_path, layout, dtype):
    model = sparse_conv(layout, dtype)
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(model, src)
    proc = _cli("optimize", src, "-o", out, "--no-verify", "--max-error", "none", "--rank", "8")
    assert proc.returncode == 0, proc.stderr
    x = np.random.default_rng(0).standard_normal((1, 8, 9, 9)).astype(dtype)
    want = ort.InferenceSession(str(src)).run(None, {"x": x})[0]
    result = load_model(out)
    assert all(t.data_type == helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
               for t in result.graph.initializer)
    got = ort.InferenceSession(str(out)).run(None, {"x": x})[0]  # loads: no float64 weight
    assert got.dtype == dtype and got.shape == want.shape
    # unfactorised (the prepared model), the densified weight is exactly the sparse one
    _, report = optimize(load_model(src), "auto", "vbmf", include=["none"], max_error=None,
                         verify=True)
    assert report.output_error == 0.0


def test_unverified_result_ort_would_refuse_is_never_returned(monkeypatch):
    """The class behind 13.7: whatever makes a weight float64 (here onnx-graphsurgeon's own
    densifying, put back), an unverified run refuses the result instead of writing it."""
    import onnxlr.graph
    monkeypatch.setattr(onnxlr.graph, "_densify_sparse", lambda graph: None)
    with pytest.raises(OnnxlrError, match="type inference refuses it"):
        optimize(sparse_conv(), "auto", "vbmf", max_error=None, verify=False)
