"""Tests for onnxlr.benchmark: models timed side by side; figures, renderings, input checks.

Timing is noisy on shared machines, so nothing here asserts which model is faster.
"""
from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxlr import benchmark as bm
from onnxlr.errors import OnnxlrError

N = 256
R = 32


def _save(tmp_path, name, nodes, inits, x_shape=("N", N), y_shape=("N", N), x_name="x",
          x_type=TensorProto.FLOAT):
    graph = helper.make_graph(
        nodes, name, [helper.make_tensor_value_info(x_name, x_type, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(y_shape))], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = tmp_path / f"{name}.onnx"
    onnx.save_model(model, str(path))
    return str(path)


def _dense(tmp_path, name="dense", **kw):
    w = np.random.default_rng(0).standard_normal((N, N)).astype(np.float32)
    return _save(tmp_path, name, [helper.make_node("MatMul", ["x", "w"], ["y"])],
                 [numpy_helper.from_array(w, "w")], **kw)


def _low_rank(tmp_path, name="lowrank"):
    rng = np.random.default_rng(1)
    u = rng.standard_normal((N, R)).astype(np.float32)
    v = rng.standard_normal((R, N)).astype(np.float32)
    return _save(tmp_path, name, [helper.make_node("MatMul", ["x", "u"], ["h"]),
                                  helper.make_node("MatMul", ["h", "v"], ["y"])],
                 [numpy_helper.from_array(u, "u"), numpy_helper.from_array(v, "v")])


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    return bm.benchmark([_dense(tmp), _low_rank(tmp)], threads=1, batch=4, warmup=2, iterations=20)


def test_two_models_figures(result):
    assert len(result.models) == 2
    dense, low = result.models
    assert dense.path.endswith("dense.onnx") and low.path.endswith("lowrank.onnx")
    assert dense.speedup == 1.0
    assert dense.params == N * N and low.params == 2 * N * R
    for m in result.models:
        s = m.latency
        assert all(math.isfinite(x) and x > 0 for x in (s.median_ms, s.p10_ms, s.p90_ms, s.mean_ms))
        assert s.p10_ms <= s.median_ms <= s.p90_ms
        assert s.iterations == result.iterations == 20
        assert math.isfinite(m.speedup) and m.speedup > 0
        assert m.throughput == pytest.approx(4 / (s.median_ms / 1e3))
        assert m.file_bytes > 4 * m.params  # float32 weights plus the graph
        assert m.peak_rss_mb is None or m.peak_rss_mb >= 0
    assert (result.provider, result.threads, result.batch, result.opt_level) == ("cpu", 1, 4, "all")
    assert "onnxruntime" in result.machine


def test_json_round_trips(result):
    data = json.loads(result.to_json())
    assert data["schema"] == bm.SCHEMA
    assert data == result.to_dict()
    assert [m["path"] for m in data["models"]] == [m.path for m in result.models]
    assert data["models"][0]["speedup"] == 1.0
    assert data["models"][1]["latency"]["median_ms"] == result.models[1].latency.median_ms
    assert data["settings"] == {"provider": "cpu", "threads": 1, "batch": 4, "opt_level": "all",
                                "iterations": 20}


def test_text_table(result):
    text = result.to_text()
    lines = text.splitlines()
    assert "provider cpu" in lines[0] and "threads 1" in lines[0] and "batch 4" in lines[0]
    assert lines[1].startswith("machine: ") and "onnxruntime" in lines[1]
    header = next(line for line in lines if line.startswith("model"))
    for col in ("params", "median ms", "p10", "p90", "throughput", "speed-up"):
        assert col in header
    assert any("dense.onnx" in line and "1.00x" in line for line in lines)
    assert any("lowrank.onnx" in line and "16.4k" in line for line in lines)  # 2*256*32 params
    assert ("warning:" in text) == bool(result.noisy)


def test_markdown_table(result):
    md = result.to_markdown()
    rows = [line for line in md.splitlines() if line.startswith("|")]
    assert len(rows) == 2 + 2  # header, separator, one row per model
    assert rows[1].startswith("|---|")
    assert all(row.count("|") == len(bm.BenchResult.HEADER) + 1 for row in rows)


def test_noisy_warning(result):
    quiet = bm.BenchResult(**{**result.__dict__, "models": [
        bm.ModelBench(**{**m.__dict__, "latency": bm.LatencyStats(1.0, 0.9, 1.1, 1.0, 20)})
        for m in result.models]})
    assert not quiet.noisy and "warning" not in quiet.to_text()
    assert quiet.to_dict()["warnings"] == []
    busy = bm.BenchResult(**{**quiet.__dict__, "models": [
        quiet.models[0], bm.ModelBench(**{**quiet.models[1].__dict__,
                                          "latency": bm.LatencyStats(2.0, 1.0, 3.0, 2.0, 20)})]})
    assert busy.noisy == [busy.models[1]]
    assert "warning: timings are noisy (p90/p10 up to 3.00" in busy.to_text()
    assert "**warning**" in busy.to_markdown() and busy.to_dict()["warnings"]


def test_threads_default_noted(tmp_path):
    res = bm.benchmark([_dense(tmp_path)], warmup=0, iterations=3)
    assert res.threads is None and len(res.models) == 1 and res.models[0].speedup == 1.0
    assert "note: threads not fixed" in res.to_text()
    assert "threads ORT default" in res.to_text().splitlines()[0]


def test_same_model_twice_and_input_shapes(tmp_path):
    path = _dense(tmp_path)
    res = bm.benchmark([path, path], threads=1, input_shapes={"x": (3, N)}, warmup=1, iterations=5,
                       max_seconds=0.0)
    assert [m.path for m in res.models] == [path, path]
    assert res.batch == 3  # the leading dim of the given shape is the batch
    assert res.iterations == 5  # max_seconds still lets 5 rounds run


def test_count_params_constants_and_subgraphs():
    const = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(
        np.zeros((3, 4), np.float32)))
    ints = helper.make_node("Constant", [], ["s"], value=numpy_helper.from_array(
        np.array([1, 2], np.int64)))
    scalar = helper.make_node("Constant", [], ["f"], value_floats=[1.0, 2.0])
    then = helper.make_graph([helper.make_node("Identity", ["t"], ["o"])], "then", [],
                             [helper.make_tensor_value_info("o", TensorProto.FLOAT, [5])],
                             [numpy_helper.from_array(np.ones(5, np.float16), "t")])
    node_if = helper.make_node("If", ["cond"], ["z"], then_branch=then, else_branch=then)
    graph = helper.make_graph(
        [const, ints, scalar, node_if], "g",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [5])],
        [numpy_helper.from_array(np.ones((2, 2), np.float64), "d"),
         numpy_helper.from_array(np.ones(7, np.int32), "i")])
    model = helper.make_model(graph)
    assert bm.count_params(model) == 12 + 2 + 5 + 5 + 4  # both If branches hold a 5-vector


@pytest.mark.parametrize("kind", ["name", "size", "dtype", "rank"])
def test_mismatched_inputs_refused(tmp_path, kind):
    first = _dense(tmp_path)
    if kind == "name":
        other = _save(tmp_path, "other", [helper.make_node("MatMul", ["input", "w"], ["y"])],
                      [numpy_helper.from_array(np.ones((N, N), np.float32), "w")], x_name="input")
    elif kind == "size":
        other = _save(tmp_path, "other", [helper.make_node("MatMul", ["x", "w"], ["y"])],
                      [numpy_helper.from_array(np.ones((128, N), np.float32), "w")],
                      x_shape=("N", 128))
    elif kind == "dtype":
        cast = helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)
        other = _save(tmp_path, "other", [cast], [], x_type=TensorProto.DOUBLE)
    else:
        other = _save(tmp_path, "other", [helper.make_node("MatMul", ["x", "w"], ["y"])],
                      [numpy_helper.from_array(np.ones((N, N), np.float32), "w")],
                      x_shape=("B", "N", N), y_shape=("B", "N", N))
    with pytest.raises(OnnxlrError, match="models take different inputs") as info:
        bm.benchmark([first, other], threads=1, warmup=0, iterations=1)
    assert "other.onnx takes (" in str(info.value)


def test_symbolic_dim_matches_fixed(tmp_path):
    fixed = _dense(tmp_path, "fixed", x_shape=(2, N), y_shape=(2, N))
    res = bm.benchmark([_dense(tmp_path), fixed], threads=1, batch=2, warmup=0, iterations=2)
    assert len(res.models) == 2 and res.batch == 2


@pytest.mark.parametrize("kwargs, match", [
    ({"paths": []}, "no models"),
    ({"batch": 0}, "--batch"),
    ({"iterations": 0}, "--iterations"),
    ({"provider": "tpu"}, "unknown provider"),
    ({"opt_level": "max"}, "unknown optimisation level"),
    ({"threads": 0}, "--threads"),
])
def test_bad_settings(tmp_path, kwargs, match):
    kwargs = {"paths": [_dense(tmp_path)], **kwargs}
    with pytest.raises(OnnxlrError, match=match):
        bm.benchmark(kwargs.pop("paths"), **kwargs)


def test_missing_file(tmp_path):
    with pytest.raises(OnnxlrError, match="no such file"):
        bm.benchmark([str(tmp_path / "nope.onnx")])


def test_cuda_provider_is_passed_through(tmp_path, monkeypatch):
    """No GPU here: check that 'cuda' reaches make_session (and fails cleanly without CUDA)."""
    seen = []

    def fake_make_session(path, *, provider, threads, opt_level):
        seen.append(provider)
        raise OnnxlrError("stop")
    monkeypatch.setattr(bm, "providers_for", lambda name: ["CUDAExecutionProvider"])
    monkeypatch.setattr(bm, "make_session", fake_make_session)
    with pytest.raises(OnnxlrError, match="stop"):
        bm.benchmark([_dense(tmp_path)], provider="cuda")
    assert seen == ["cuda"]
