"""Calibration loading (onnxlr.calib.load_calibration) and activation capture (capture)."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import make_model, init, vinfo
from numpy_ref import conv_nd
from onnx import TensorProto, helper

from onnxlr.calib import Calibration, GramReducer, capture, load_calibration
from onnxlr.errors import OnnxlrError


def two_conv(rng, batch="N"):
    """conv(3→6, 3×3, pad 1) → Relu → conv(6→4, 3×3, stride 2): the Relu output is an
    intermediate tensor with a known float64 value."""
    w1 = rng.standard_normal((6, 3, 3, 3)).astype(np.float32)
    b1 = rng.standard_normal(6).astype(np.float32)
    w2 = rng.standard_normal((4, 6, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
             helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2", strides=[2, 2])]
    model = make_model(nodes, [vinfo("x", [batch, 3, 7, 7])], [vinfo("y", None)],
                       [init("w1", w1), init("b1", b1), init("w2", w2)])
    return model, (w1, b1, w2)


@pytest.fixture
def model(rng):
    return two_conv(rng)[0]


def test_npz_batches_labels_split(model, rng, tmp_path):
    x = rng.standard_normal((37, 3, 7, 7)).astype(np.float32)
    path = tmp_path / "c.npz"
    np.savez(path, x=x, label=np.arange(37))
    calib = load_calibration(str(path), model, batch_size=8)
    assert (calib.num_samples, calib.num_batches) == (37, 5)
    batches = list(calib)
    assert [b["x"].shape[0] for b in batches] == [8, 8, 8, 8, 5]
    assert set(batches[0]) == {"x"}  # the label is not fed to the model
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), x)
    np.testing.assert_array_equal(calib.labels(), np.arange(37))
    head, tail = calib.split(7)
    assert (head.num_samples, tail.num_samples) == (30, 7)
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in tail]), x[30:])
    assert load_calibration(str(path), model, max_samples=10).num_samples == 10


def test_gather_reads_inputs_and_labels_in_one_pass(model, rng, tmp_path, monkeypatch):
    import onnxlr.calib.loading as calib_module

    x = rng.standard_normal((20, 3, 7, 7)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x, label=np.arange(20))
    np.savez(tmp_path / "d.npz", x=x[:5])  # no labels here: gather returns none
    _, tail = load_calibration(str(tmp_path / "c.npz"), model, batch_size=8).split(12)
    reads = []
    real = calib_module._read_npz
    monkeypatch.setattr(calib_module, "_read_npz", lambda p: reads.append(p) or real(p))
    got = tail.gather()
    assert len(reads) == 1 and set(got) == {"x", "label"}
    np.testing.assert_array_equal(got["x"], x[8:])
    np.testing.assert_array_equal(got["label"], np.arange(8, 20))
    assert set(load_calibration(tmp_path, model).gather()) == {"x"}


def test_folder_of_npy_and_npz(model, rng, tmp_path):
    x = rng.standard_normal((9, 3, 7, 7)).astype(np.float64)  # float64 is cast to float32
    np.save(tmp_path / "a_one.npy", x[0])                        # one sample, no sample axis
    np.save(tmp_path / "b_batch.npy", x[1:5])
    np.savez(tmp_path / "c.npz", x=x[5:])
    calib = load_calibration(tmp_path, model, batch_size=4)
    got = np.concatenate(list(b["x"] for b in calib))
    assert got.dtype == np.float32 and calib.num_samples == 9
    np.testing.assert_allclose(got, x.astype(np.float32))


def test_iterables_and_generators(model, rng):
    feeds = [{"x": rng.standard_normal((n, 3, 7, 7)).astype(np.float32)} for n in (3, 5, 2)]
    calib = load_calibration(feeds, model, batch_size=4)
    assert [b["x"].shape[0] for b in calib] == [4, 4, 2]
    gen = ({"x": f["x"]} for f in feeds)
    assert load_calibration(gen, model, max_samples=6).num_samples == 6


@pytest.mark.parametrize("arrays,match", [
    ({"input": np.zeros((2, 3, 7, 7), np.float32)}, r"c\.npz lacks input\(s\) 'x'; it has 'input'"),
    ({"x": np.zeros((2, 3, 8, 7), np.float32)}, r"c\.npz: 'x' has shape \(2, 3, 8, 7\), the model fixes dim 2 to 7"),
    ({"x": np.zeros((3, 7, 7), np.float32)}, r"'x' has shape \(3, 7, 7\), the model expects rank 4"),
    ({"x": np.zeros((2, 3, 7, 7), np.int64)}, r"'x' is int64 but the model expects float32"),
])
def test_bad_npz_one_line_errors(model, tmp_path, arrays, match):
    path = tmp_path / "c.npz"
    np.savez(path, **arrays)
    with pytest.raises(OnnxlrError, match=match) as err:
        load_calibration(str(path), model)
    assert "\n" not in str(err.value)


def test_bad_sources(model, tmp_path):
    with pytest.raises(OnnxlrError, match=r"folder .* has no \.npy or \.npz files"):
        load_calibration(tmp_path, model)
    with pytest.raises(OnnxlrError, match="does not exist"):
        load_calibration(tmp_path / "nope.npz", model)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(OnnxlrError, match="cannot read calibration file .*bad.npz"):
        load_calibration(tmp_path / "bad.npz", model)
    with pytest.raises(OnnxlrError, match=r"feed dict #1 lacks input"):
        load_calibration([{"x": np.zeros((1, 3, 7, 7), np.float32)}, {"y": 1}], model)
    with pytest.raises(OnnxlrError, match="not a dict"):
        load_calibration([np.zeros(3)], model)
    with pytest.raises(OnnxlrError, match="holds no samples"):
        load_calibration([{"x": np.zeros((0, 3, 7, 7), np.float32)}], model)


def test_fixed_batch_dim_gives_exact_batches(rng):
    model = two_conv(rng, batch=2)[0]
    calib = load_calibration([{"x": np.zeros((5, 3, 7, 7), np.float32)}], model, batch_size=16)
    assert calib.batch_size == 2 and calib.num_samples == 4
    assert [b["x"].shape[0] for b in calib] == [2, 2]


def test_capture_intermediate_matches_float64_reference(rng):
    model, (w1, b1, w2) = two_conv(rng)
    x = rng.standard_normal((10, 3, 7, 7)).astype(np.float32)
    got = capture(model, load_calibration({"x": x}, model, batch_size=4), ["r1", "x", "y"])
    relu = np.maximum(conv_nd(x, w1, b1, pads=[1, 1, 1, 1]), 0)
    np.testing.assert_allclose(got["r1"], relu, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(got["x"], x)
    np.testing.assert_allclose(got["y"], conv_nd(relu, w2, strides=[2, 2]), rtol=1e-4, atol=1e-3)
    with pytest.raises(OnnxlrError, match="cannot capture tensor 'w1': it is a constant"):
        capture(model, {"x": x}, ["w1"])
    with pytest.raises(OnnxlrError, match="cannot capture tensor 'nope': it is not in the graph"):
        capture(model, {"x": x}, ["nope"])


def test_capture_subsamples_positions_seeded(model, rng):
    x = rng.standard_normal((6, 3, 7, 7)).astype(np.float32)
    full = capture(model, {"x": x}, ["r1", "c1"])
    sub = capture(model, load_calibration({"x": x}, model, batch_size=4), ["r1", "c1", "y"],
                  max_positions=5, seed=3)
    assert sub["r1"].shape == (6 * 5, 6)          # rows = samples × positions, cols = channels
    assert sub["y"].shape == (6 * 5, 4)
    # a map with no more positions than asked for keeps them all, in order
    y_all = capture(model, {"x": x}, ["y"], max_positions=9)["y"]
    np.testing.assert_array_equal(y_all, capture(model, {"x": x}, ["y"])["y"]
                                  .transpose(0, 2, 3, 1).reshape(54, 4))
    # every row is a real (sample, position) column of the full map
    maps = full["r1"].transpose(0, 2, 3, 1).reshape(6, 49, 6)
    for i, row in enumerate(sub["r1"]):
        assert np.min(np.abs(maps[i // 5] - row).max(axis=1)) == 0
    # same-shaped tensors share positions: relu(c1) rows are relu of the c1 rows
    np.testing.assert_array_equal(sub["r1"], np.maximum(sub["c1"], 0))
    again = capture(model, load_calibration({"x": x}, model, batch_size=4), ["r1"],
                    max_positions=5, seed=3)
    np.testing.assert_array_equal(again["r1"], sub["r1"])


def test_gram_reducer_streams_the_same_statistics(model, rng):
    x = rng.standard_normal((11, 3, 7, 7)).astype(np.float32)
    calib = load_calibration({"x": x}, model, batch_size=3)
    rows = capture(model, calib, ["r1"], max_positions=8)["r1"].astype(np.float64)
    stats = capture(model, calib, ["r1"], max_positions=8, reducer=GramReducer())["r1"]
    assert stats.count == rows.shape[0] == 11 * 8
    np.testing.assert_allclose(stats.gram, rows.T @ rows / rows.shape[0], rtol=1e-10)
    np.testing.assert_allclose(stats.mean, rows.mean(axis=0), rtol=1e-10)


def test_progress_reports_samples(model, rng):
    seen = []
    x = rng.standard_normal((5, 3, 7, 7)).astype(np.float32)
    capture(model, load_calibration({"x": x}, model, batch_size=2), ["r1"],
            progress=lambda done, total, what: seen.append((done, total, what)))
    assert seen == [(2, 5, "calibration"), (4, 5, "calibration"), (5, 5, "calibration")]


def test_calibration_object_is_accepted_as_source(model, rng):
    calib = load_calibration({"x": np.zeros((3, 3, 7, 7), np.float32)}, model)
    assert isinstance(calib, Calibration)
    assert load_calibration(calib, model) is calib
    assert load_calibration(calib, model, max_samples=2).num_samples == 2


def test_multi_input_folder_by_input_name(rng, tmp_path):
    nodes = [helper.make_node("Add", ["a", "b"], ["y"], name="add")]
    model = make_model(nodes, [vinfo("a", ["N", 4]), vinfo("b", ["N", 4])],
                       [vinfo("y", ["N", 4])])
    np.save(tmp_path / "a.npy", np.ones((3, 4), np.float32))
    np.save(tmp_path / "b.npy", np.full((3, 4), 2, np.float32))
    got = capture(model, tmp_path, ["y"])["y"]
    np.testing.assert_array_equal(got, np.full((3, 4), 3, np.float32))
    np.save(tmp_path / "stray.npy", np.ones((3, 4), np.float32))
    with pytest.raises(OnnxlrError, match="stray.npy: a model with several inputs"):
        load_calibration(tmp_path, model)
    assert TensorProto.FLOAT  # the builders above are float32 models


def test_expose_infers_shapes_only_when_the_model_lacks_them(model, monkeypatch):
    """The exposed tensors get their types from the model's value_info when it has them
    (a model onnxlr exported); shape inference runs only for a model without them."""
    import onnx

    import onnxlr.graph
    from onnxlr.calib import expose
    from onnxlr.graph import infer_shapes

    inferred = []
    monkeypatch.setattr(onnxlr.graph, "infer_shapes",
                        lambda m: inferred.append(1) or infer_shapes(m))
    bare = expose(model, ["r1"])
    assert len(inferred) == 1
    out = {o.name: o for o in bare.graph.output}["r1"]
    assert out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    again = expose(infer_shapes(model), ["r1"])
    assert len(inferred) == 1  # known already: nothing inferred
    assert {o.name: o for o in again.graph.output}["r1"] == out
