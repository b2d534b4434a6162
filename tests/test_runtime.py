"""Tests for onnxlr.runtime: feeds, sessions, output comparison and interleaved timing."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxlr import runtime as rt
from onnxlr.errors import OnnxlrError


def _model(inputs, outputs, nodes, inits=(), opset=17, extra_opsets=()):
    graph = helper.make_graph(nodes, "t", inputs, outputs, list(inits))
    opsets = [helper.make_opsetid("", opset), *extra_opsets]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model


def _matmul_model(shape=("N", 8), k=8, n=4, seed=0):
    w = np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)
    return _model([helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [shape[0], n])],
                  [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                  [numpy_helper.from_array(w, "w")])


def test_import_does_not_load_onnxruntime():
    code = "import sys, onnxlr.runtime; assert 'onnxruntime' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_missing_onnxruntime_is_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(OnnxlrError, match=r"onnxruntime is not installed: pip install 'onnxlr\[cpu\]'"):
        rt.make_session(_matmul_model())


# --- parse_input_shapes -------------------------------------------------------------------------

def test_parse_input_shapes():
    assert rt.parse_input_shapes(["input:1x3x224x224", "ids:2X128", "a:b:5"]) == {
        "input": (1, 3, 224, 224), "ids": (2, 128), "a:b": (5,)}


@pytest.mark.parametrize("spec", ["input", "input:", ":1x2", "input:1x0", "input:1xa", "input:-1x3"])
def test_parse_input_shapes_bad(spec):
    with pytest.raises(OnnxlrError, match="bad input shape") as info:
        rt.parse_input_shapes([spec])
    assert repr(spec) in str(info.value)


def test_parse_input_shapes_duplicate():
    with pytest.raises(OnnxlrError, match="'x'.*twice"):
        rt.parse_input_shapes(["x:1", "x:2"])


# --- make_inputs --------------------------------------------------------------------------------

def test_make_inputs_static_and_dtypes():
    model = _model(
        [helper.make_tensor_value_info("f", TensorProto.FLOAT, [2, 3]),
         helper.make_tensor_value_info("h", TensorProto.FLOAT16, [4]),
         helper.make_tensor_value_info("d", TensorProto.DOUBLE, [1, 1]),
         helper.make_tensor_value_info("i", TensorProto.INT64, [5, 6]),
         helper.make_tensor_value_info("j", TensorProto.INT32, [7]),
         helper.make_tensor_value_info("b", TensorProto.BOOL, [3])],
        [helper.make_tensor_value_info("o", TensorProto.FLOAT, [2, 3])],
        [helper.make_node("Identity", ["f"], ["o"])])
    feeds = rt.make_inputs(model, seed=1)
    assert list(feeds) == ["f", "h", "d", "i", "j", "b"]
    expect = {"f": (np.float32, (2, 3)), "h": (np.float16, (4,)), "d": (np.float64, (1, 1)),
              "i": (np.int64, (5, 6)), "j": (np.int32, (7,)), "b": (np.bool_, (3,))}
    for name, (dtype, shape) in expect.items():
        assert feeds[name].dtype == dtype and feeds[name].shape == shape, name
    assert feeds["i"].min() >= 0 and feeds["i"].max() < 10
    again = rt.make_inputs(model, seed=1)
    assert all(np.array_equal(feeds[k], again[k]) for k in feeds)
    assert not np.array_equal(feeds["f"], rt.make_inputs(model, seed=2)["f"])


def test_make_inputs_skips_initializer_inputs():
    model = _matmul_model(shape=(3, 8))
    model.graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [8, 4]))
    assert list(rt.make_inputs(model)) == ["x"]


def test_make_inputs_dynamic_batch_and_override():
    model = _matmul_model(shape=("N", 8))
    assert rt.make_inputs(model)["x"].shape == (1, 8)
    assert rt.make_inputs(model, batch=6)["x"].shape == (6, 8)
    assert rt.make_inputs(model, {"x": (3, 8)}, batch=6)["x"].shape == (3, 8)
    unknown_batch = _model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8])],
                           [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                           [helper.make_node("Identity", ["x"], ["y"])])
    assert rt.make_inputs(unknown_batch, batch=2)["x"].shape == (2, 8)


def test_make_inputs_dynamic_seq_dim_gets_the_default_and_follows_given_shapes():
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", "seq"])
    mask = helper.make_tensor_value_info("mask", TensorProto.INT64, ["N", "seq"])
    model = _model([ids, mask], [helper.make_tensor_value_info("y", TensorProto.INT64, None)],
                   [helper.make_node("Add", ["ids", "mask"], ["y"])])
    notes: list[str] = []
    feeds = rt.make_inputs(model, notes=notes)
    assert rt.DEFAULT_DIM == 128
    assert feeds["ids"].shape == feeds["mask"].shape == (1, 128)
    assert notes[0] == "dynamic dim 'seq' set to 128 (the default; --input-shape to change)"
    # a shape given for one input pins its symbols for the others: the feeds stay consistent
    given = rt.make_inputs(model, {"ids": (2, 16)}, notes=(notes := []))
    assert given["ids"].shape == given["mask"].shape == (2, 16)
    assert not any("dynamic dim" in n for n in notes)


def _embedding_model(token_rows=50, type_rows=2, position_rows=None):
    """input_ids / token_type_ids / attention_mask [N, seq] like a BERT export: word and type
    tables gathered, the mask cast to float and multiplied in."""
    rng = np.random.default_rng(0)
    tables = [numpy_helper.from_array(rng.standard_normal((rows, 4)).astype(np.float32), name)
              for name, rows in (("word", token_rows), ("type", type_rows))]
    nodes = [helper.make_node("Gather", ["word", "input_ids"], ["we"], name="word_gather"),
             helper.make_node("Cast", ["token_type_ids"], ["tt"], to=TensorProto.INT32),
             helper.make_node("Gather", ["type", "tt"], ["te"], name="type_gather"),
             helper.make_node("Add", ["we", "te"], ["emb"]),
             helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["m", "axes"], ["m3"]),
             helper.make_node("Mul", ["emb", "m3"], ["y"])]
    tables.append(numpy_helper.from_array(np.array([2], np.int64), "axes"))
    if position_rows:  # the ids also index a smaller table through an Unsqueeze
        tables.append(numpy_helper.from_array(
            rng.standard_normal((position_rows, 4)).astype(np.float32), "pos"))
        nodes[-1:] = [helper.make_node("Unsqueeze", ["input_ids", "axes"], ["ids3"]),
                      helper.make_node("Gather", ["pos", "ids3"], ["pe"], name="pos_gather"),
                      helper.make_node("Mul", ["emb", "m3"], ["y0"]),
                      helper.make_node("ReduceSum", ["pe"], ["y1"], keepdims=0),
                      helper.make_node("Add", ["y0", "y1"], ["y"])]
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"])
              for n in ("input_ids", "attention_mask", "token_type_ids")]
    return _model(inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                  nodes, tables)


def test_make_inputs_token_inputs_stay_inside_their_tables():
    model = _embedding_model(token_rows=50, type_rows=2)
    notes: list[str] = []
    feeds = rt.make_inputs(model, {"input_ids": (8, 32)}, notes=notes)
    ids = feeds["input_ids"]
    assert ids.shape == (8, 32) and ids.dtype == np.int64
    assert ids.min() >= 0 and ids.max() < 50 and ids.max() >= 4  # the whole table, not [0, 4)
    assert np.array_equal(feeds["token_type_ids"], np.zeros((8, 32), np.int64))
    assert np.array_equal(feeds["attention_mask"], np.ones((8, 32), np.int64))
    assert "token_type_ids: zeros (type ids; Gather 'type_gather' has 2 rows)" in notes
    assert "attention_mask: ones (a mask)" in notes
    # ORT runs it: the 2-row type table is not overflowed; float64 reference for the output
    out = rt.run(rt.make_session(model), feeds)["y"]
    word = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    typ = numpy_helper.to_array(model.graph.initializer[1]).astype(np.float64)
    np.testing.assert_allclose(out, word[ids] + typ[0], rtol=1e-6, atol=1e-6)


def test_make_inputs_ids_bounded_by_the_smallest_table_they_reach():
    model = _embedding_model(token_rows=50, type_rows=2, position_rows=10)
    notes: list[str] = []
    ids = rt.make_inputs(model, {"input_ids": (4, 64)}, notes=notes)["input_ids"]
    assert ids.min() >= 0 and ids.max() == 9
    assert "input_ids: random in [0, 10) (Gather 'pos_gather', the smallest table it indexes)" in notes
    rt.run(rt.make_session(model), rt.make_inputs(model))  # default seq 128 runs too


def test_make_inputs_type_ids_with_a_large_table_stay_random():
    model = _embedding_model(token_rows=50, type_rows=40)
    types = rt.make_inputs(model, {"input_ids": (4, 64)})["token_type_ids"]
    assert types.min() >= 0 and types.max() < 40 and types.max() >= 4


def test_make_inputs_shape_errors():
    model = _matmul_model(shape=("N", 8))
    with pytest.raises(OnnxlrError, match="'nope'.*model inputs: x"):
        rt.make_inputs(model, {"nope": (1, 8)})
    with pytest.raises(OnnxlrError, match="'x' has rank 2"):
        rt.make_inputs(model, {"x": (1, 8, 1)})
    with pytest.raises(OnnxlrError, match="'x' has fixed dim 8 at axis 1"):
        rt.make_inputs(model, {"x": (1, 9)})


def test_make_inputs_npz(tmp_path):
    model = _matmul_model(shape=("N", 8))
    x = np.arange(16, dtype=np.float32).reshape(2, 8)
    good = tmp_path / "good.npz"
    np.savez(good, x=x, extra=np.zeros(1))
    feeds = rt.make_inputs(model, npz=str(good))
    assert list(feeds) == ["x"] and np.array_equal(feeds["x"], x)

    np.savez(tmp_path / "missing.npz", y=x)
    with pytest.raises(OnnxlrError, match=r"missing\.npz.*'x'"):
        rt.make_inputs(model, npz=str(tmp_path / "missing.npz"))
    np.savez(tmp_path / "dtype.npz", x=x.astype(np.float64))
    with pytest.raises(OnnxlrError, match=r"dtype\.npz.*'x' is float64"):
        rt.make_inputs(model, npz=str(tmp_path / "dtype.npz"))
    np.savez(tmp_path / "rank.npz", x=x[None])
    with pytest.raises(OnnxlrError, match=r"rank\.npz.*'x' has rank 3"):
        rt.make_inputs(model, npz=str(tmp_path / "rank.npz"))
    np.savez(tmp_path / "dim.npz", x=np.zeros((2, 5), np.float32))
    with pytest.raises(OnnxlrError, match=r"dim\.npz.*'x' has 5 at axis 1"):
        rt.make_inputs(model, npz=str(tmp_path / "dim.npz"))
    with pytest.raises(OnnxlrError, match=r"cannot read inputs file .*absent\.npz"):
        rt.make_inputs(model, npz=str(tmp_path / "absent.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(OnnxlrError, match="cannot read inputs file"):
        rt.make_inputs(model, npz=str(tmp_path / "junk.npz"))


# --- sessions -----------------------------------------------------------------------------------

def test_make_session_and_run_match_numpy(tmp_path):
    model = _matmul_model(shape=("N", 8))
    feeds = rt.make_inputs(model, batch=3)
    expected = feeds["x"] @ numpy_helper.to_array(model.graph.initializer[0])
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    for source in (model, model.SerializeToString(), str(path), path):
        out = rt.run(rt.make_session(source, threads=1, opt_level="basic"), feeds)
        assert list(out) == ["y"]
        np.testing.assert_allclose(out["y"], expected, rtol=1e-5, atol=1e-5)


def test_make_session_unknown_custom_op():
    model = _model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
                   [helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example")],
                   extra_opsets=[helper.make_opsetid("com.example", 1)])
    with pytest.raises(OnnxlrError, match="onnxruntime cannot load") as info:
        rt.make_session(model)
    assert "\n" not in str(info.value) and "Frobnicate" in str(info.value)


def test_make_session_user_errors(tmp_path):
    with pytest.raises(OnnxlrError, match="does not exist"):
        rt.make_session(str(tmp_path / "none.onnx"))
    with pytest.raises(OnnxlrError, match="unknown provider 'tpu'"):
        rt.make_session(_matmul_model(), provider="tpu")
    with pytest.raises(OnnxlrError, match="unknown optimisation level"):
        rt.make_session(_matmul_model(), opt_level="max")


def test_providers_for():
    assert rt.providers_for("cpu") == ["CPUExecutionProvider"]
    import onnxruntime as ort
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert rt.providers_for("CUDA")[0] == "CUDAExecutionProvider"
    else:
        with pytest.raises(OnnxlrError, match="'cuda' needs CUDAExecutionProvider"):
            rt.providers_for("cuda")


def test_run_bad_feed_is_user_error():
    session = rt.make_session(_matmul_model(shape=("N", 8)))
    with pytest.raises(OnnxlrError, match="failed to run"):
        rt.run(session, {"x": np.zeros((2, 5), np.float32)})


# --- compare_outputs ----------------------------------------------------------------------------

def test_compare_identical():
    a = np.random.default_rng(0).standard_normal((4, 10)).astype(np.float32)
    cmp = rt.compare_outputs({"y": a}, {"y": a.copy()}, max_error=0.0)
    (o,) = cmp.outputs
    assert (o.name, o.rel_l2, o.max_abs, o.top1_agreement) == ("y", 0.0, 0.0, 1.0)
    assert o.cosine == pytest.approx(1.0)
    assert bool(cmp) and cmp.worst_rel_l2 == 0.0


def test_compare_known_perturbation():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((3, 5, 7)).astype(np.float32)
    noise = rng.standard_normal(a.shape).astype(np.float32)
    b = a + 0.01 * noise
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    cmp = rt.compare_outputs({"y": a}, {"y": b}, max_error=0.02)
    (o,) = cmp.outputs
    assert o.rel_l2 == pytest.approx(np.linalg.norm(a64 - b64) / np.linalg.norm(a64), rel=1e-12)
    assert o.rel_l2 == pytest.approx(0.01 * np.linalg.norm(noise) / np.linalg.norm(a), rel=1e-3)
    assert o.max_abs == pytest.approx(np.abs(a64 - b64).max())
    assert o.cosine == pytest.approx(a64 @ b64 / np.linalg.norm(a64) / np.linalg.norm(b64))
    assert o.top1_agreement is None  # 3-D, not class scores
    assert bool(cmp)
    assert not rt.compare_outputs({"y": a}, {"y": b}, max_error=0.001)
    assert bool(rt.compare_outputs({"y": a}, {"y": 2 * a}))  # no bound: always passes
    assert rt.compare_outputs({"y": a}, {"y": 2 * a}).outputs[0].rel_l2 == pytest.approx(1.0)
    assert rt.compare_outputs({"y": a}, {"y": -a}).outputs[0].cosine == pytest.approx(-1.0)


def test_compare_top1_agreement():
    ref = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.3, 0.3, 0.4]], np.float32)
    cand = np.array([[0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.2, 0.3, 0.5], [0.5, 0.3, 0.2]], np.float32)
    assert rt.compare_outputs({"p": ref}, {"p": cand}).outputs[0].top1_agreement == pytest.approx(0.5)
    squeezed = rt.compare_outputs({"p": ref[:, :, None, None]}, {"p": cand[:, :, None, None]})
    assert squeezed.outputs[0].top1_agreement == pytest.approx(0.5)
    one_row = rt.compare_outputs({"p": ref[None, 1]}, {"p": cand[None, 1]})
    assert one_row.outputs[0].top1_agreement == 0.0
    for shape in [(4,), (4, 1), (2, 3, 2)]:
        x = np.ones(shape, np.float32)
        assert rt.compare_outputs({"p": x}, {"p": x}).outputs[0].top1_agreement is None, shape


def test_compare_zero_reference_and_non_finite():
    z = np.zeros((2, 3), np.float32)
    o = rt.compare_outputs({"y": z}, {"y": z}).outputs[0]
    assert (o.rel_l2, o.max_abs, o.cosine) == (0.0, 0.0, 1.0)
    small = np.full((2, 3), 1e-3, np.float32)
    o = rt.compare_outputs({"y": z}, {"y": small}).outputs[0]
    assert o.rel_l2 == pytest.approx(np.linalg.norm(small.astype(np.float64)))  # absolute L2
    assert o.cosine == 0.0
    bad = small.copy()
    bad[0, 0] = np.nan
    cmp = rt.compare_outputs({"y": small}, {"y": bad}, max_error=1.0)
    assert math.isinf(cmp.outputs[0].rel_l2) and not cmp
    assert rt.compare_outputs({"y": bad}, {"y": bad.copy()}).outputs[0].rel_l2 == 0.0


def test_compare_non_float_outputs():
    labels = np.array([1, 2, 3, 4], np.int64)
    o = rt.compare_outputs({"label": labels}, {"label": np.array([1, 2, 0, 4], np.int64)}).outputs[0]
    assert (o.rel_l2, o.max_abs, o.cosine, o.top1_agreement) == (0.25, 3.0, 0.75, None)
    same = rt.compare_outputs({"label": labels}, {"label": labels.copy()}).outputs[0]
    assert (same.rel_l2, same.cosine) == (0.0, 1.0)
    words = np.array(["a", "b"], dtype=object)
    o = rt.compare_outputs({"w": words}, {"w": np.array(["a", "c"], dtype=object)}).outputs[0]
    assert (o.rel_l2, o.max_abs, o.cosine) == (0.5, 1.0, 0.5)


def test_comparison_multiple_outputs_and_dict():
    a, b = np.ones((2, 3), np.float32), np.ones(4, np.float32)
    cmp = rt.compare_outputs({"a": a, "b": b}, {"b": b * 1.5, "a": a}, max_error=0.4)
    assert [o.name for o in cmp.outputs] == ["a", "b"]
    assert cmp.worst_rel_l2 == pytest.approx(0.5) and not cmp
    d = cmp.to_dict()
    assert d["passed"] is False and d["max_error"] == 0.4 and d["outputs"][1]["name"] == "b"
    assert rt.Comparison([], 0.1).worst_rel_l2 == 0.0


def test_compare_errors():
    a = np.ones((2, 3), np.float32)
    with pytest.raises(OnnxlrError, match="no output 'a'"):
        rt.compare_outputs({"a": a}, {"b": a})
    with pytest.raises(OnnxlrError, match="output 'a' has shape"):
        rt.compare_outputs({"a": a}, {"a": a.T})


# --- latency ------------------------------------------------------------------------------------

def test_interleaved_latency_two_sessions():
    small, big = _matmul_model(("N", 8), 8, 4), _matmul_model(("N", 64), 64, 64, seed=1)
    sessions = [rt.make_session(small, threads=1), rt.make_session(big, threads=1)]
    feeds = [rt.make_inputs(small, batch=4), rt.make_inputs(big, batch=4)]
    result = rt.interleaved_latency(sessions, feeds, warmup=2, iterations=12)
    assert len(result.stats) == 2 and len(result.speedups) == 2
    assert result.speedups[0] == 1.0 and result.speedups[1] > 0
    for s in result.stats:
        assert s.iterations == 12
        assert 0 < s.p10_ms <= s.median_ms <= s.p90_ms and s.mean_ms > 0


def test_interleaved_latency_shared_feeds_and_budget():
    model = _matmul_model(("N", 8))
    sessions = [rt.make_session(model), rt.make_session(model)]
    result = rt.interleaved_latency(sessions, rt.make_inputs(model), warmup=0, iterations=1000,
                                    max_seconds=0.0)
    assert [s.iterations for s in result.stats] == [5, 5]
    with pytest.raises(OnnxlrError, match="2 feed dicts for 1 sessions"):
        rt.interleaved_latency(sessions[:1], [{}, {}])
    with pytest.raises(OnnxlrError, match="no sessions"):
        rt.interleaved_latency([], {})


def test_sessions_do_not_spin_wait():
    """onnxlr times sessions in turn; spinning idle threads of one would take the cores from
    the next (an A/A timing of one model read 0.79-1.27x with spinning on 2 cores)."""
    opts = rt.session_options(2)
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert opts.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    assert opts.intra_op_num_threads == 2
